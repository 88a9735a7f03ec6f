"""Liveness and readiness: `/health` (the process answers), `/ready` and SageMaker's `/ping`
(every variant is loaded and can take traffic, and the process is not draining for a
shutdown), and `/metrics`."""

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


def _readiness(request: Request) -> JSONResponse:
    service: GenerationService = get_service(request)
    if request.app.state.draining.is_set():
        return JSONResponse({"status": "draining"}, status_code=503)
    if service.ready():
        return JSONResponse({"status": "ready", "models": service.model_names()})
    return JSONResponse({"status": "loading"}, status_code=503)


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"description": "a variant that answers requests is not ready, or the server is "
          "draining before a shutdown"}
}  # fmt: skip


@router.get("/ready", responses=_NOT_READY)
async def ready(request: Request) -> JSONResponse:
    return _readiness(request)


@router.get("/ping", responses=_NOT_READY)
async def ping(request: Request) -> JSONResponse:
    return _readiness(request)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
