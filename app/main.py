"""create_app(settings): builds every backend and batcher at startup, closes them at shutdown."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import admin, health, openai, tgi
from app.api.errors import install_error_handlers
from app.api.generation import GenerationRoutes, document
from app.api.middleware import EdgeMiddleware
from app.backends import Backend, create_backend
from app.cache import MemoryResponseCache, RedisResponseCache, ResponseCache
from app.experiments import Experiments
from app.gpu import register_gpu_collector
from app.metrics import Metrics
from app.report import ReportWindow
from app.service import Gateway
from app.settings import Settings
from app.shadow import ShadowRunner

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    register_gpu_collector(metrics.registry)
    variants = settings.all_variants()
    backends: dict[str, Backend] = {
        variant.name: create_backend(variant, metrics) for variant in variants
    }
    cache = _create_cache(settings)
    experiments = Experiments(
        settings.all_experiments(), settings.redis_url, settings.experiment_sync_interval_s
    )
    window = ReportWindow(settings.report_window_s)
    shadows = ShadowRunner(settings.shadow, metrics, window)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[Backend] = []
        try:
            for backend in backends.values():
                await backend.start()
                started.append(backend)
            await experiments.start()
            yield
        finally:
            await shadows.close()
            await experiments.close()
            for backend in reversed(started):
                await backend.close()
            if cache is not None:
                await cache.close()

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:  # FastAPI >= 0.165
        # Our own Prometheus metrics cover what FastAPI's OpenTelemetry hooks would; their
        # per-request check alone cost 3% of a relayed request's CPU.
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="model-gateway", version="0.1.0", lifespan=lifespan, **options)
    app.state.settings = settings
    app.state.metrics = metrics
    ttl_s = {variant.name: variant.cache_ttl_s for variant in variants}
    app.state.gateway = Gateway(backends, metrics, experiments, window, shadows, cache, ttl_s)
    routers = (openai.router, health.router, admin.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    generation_routes = {**openai.ROUTES, **tgi.ROUTES}
    app.add_middleware(GenerationRoutes, routes=generation_routes)
    document(app, generation_routes)
    endpoints = {r.path for r in app.routes if isinstance(r, APIRoute)}
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        endpoints=endpoints,
        max_body_bytes=settings.max_request_body_bytes,
    )
    return app


def create_app_from_env() -> FastAPI:
    """For `workers > 1`: uvicorn imports this in every server process."""
    return create_app(Settings())


def _create_cache(settings: Settings) -> ResponseCache | None:
    c = settings.cache
    if not c.enabled:
        return None
    if settings.redis_url:
        return RedisResponseCache(
            settings.redis_url,
            timeout_ms=c.timeout_ms,
            max_value_bytes=c.max_value_bytes,
            breaker_failures=c.breaker_failures,
            breaker_reset_s=c.breaker_reset_s,
        )
    return MemoryResponseCache(c.memory_max_bytes, c.max_value_bytes)
