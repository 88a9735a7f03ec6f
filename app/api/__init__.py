"""The HTTP side: the edge, one adapter per API (OpenAI, TGI/SageMaker), admin and health
routes, and the one mapping from domain errors to replies."""

from __future__ import annotations

from fastapi import Request

from app.service import GenerationService


def get_service(request: Request) -> GenerationService:
    """What `create_app` built to answer generations."""
    service: GenerationService = request.app.state.service
    return service
