"""create_app(settings): builds every backend and batcher at startup, closes them at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import health, openai, tgi
from app.api.errors import install_error_handlers
from app.api.middleware import EdgeMiddleware
from app.backends import Backend, create_backend
from app.gpu import register_gpu_collector
from app.metrics import Metrics
from app.service import Gateway
from app.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    register_gpu_collector(metrics.registry)
    backends: dict[str, Backend] = {
        variant.name: create_backend(variant, metrics) for variant in settings.variants
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[Backend] = []
        try:
            for backend in backends.values():
                await backend.start()
                started.append(backend)
            yield
        finally:
            for backend in reversed(started):
                await backend.close()

    app = FastAPI(title="model-gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gateway = Gateway(backends, metrics)
    routers = (openai.router, tgi.router, health.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    endpoints = {r.path for router in routers for r in router.routes if isinstance(r, APIRoute)}
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        endpoints=endpoints,
        max_body_bytes=settings.max_request_body_bytes,
    )
    return app
