"""Liveness and readiness: `/health` (the process answers), `/ready` and SageMaker's `/ping`
(every variant is loaded and can take traffic), and `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import get_gateway
from app.service import Gateway

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def _readiness(gateway: Gateway) -> JSONResponse:
    if gateway.ready():
        return JSONResponse({"status": "ready", "models": gateway.model_names()})
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    return _readiness(get_gateway(request))


@router.get("/ping")
async def ping(request: Request) -> JSONResponse:
    return _readiness(get_gateway(request))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
