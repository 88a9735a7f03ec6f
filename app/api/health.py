"""Liveness and readiness: `/health` (the process answers), `/ready` and SageMaker's `/ping`
(every variant is loaded and can take traffic), and `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from app.api import get_service
from app.service import GenerationService

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def _readiness(service: GenerationService) -> JSONResponse:
    if service.ready():
        return JSONResponse({"status": "ready", "models": service.model_names()})
    return JSONResponse({"status": "loading"}, status_code=503)


_LOADING: dict[int | str, dict[str, Any]] = {
    503: {"description": "a variant that answers requests is not ready"}
}


@router.get("/ready", responses=_LOADING)
async def ready(request: Request) -> JSONResponse:
    return _readiness(get_service(request))


@router.get("/ping", responses=_LOADING)
async def ping(request: Request) -> JSONResponse:
    return _readiness(get_service(request))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
