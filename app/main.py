"""create_app(settings): builds every backend and batcher at startup, closes them at shutdown."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import admin, health, openai, tgi
from app.api.body import BodyReaders
from app.api.edge import EdgeMiddleware
from app.api.errors import install_error_handlers
from app.backends import Backend, create_backend
from app.cache.layer import CachingBackend
from app.cache.store import MemoryResponseCache, RedisResponseCache, ResponseCache
from app.experiments.report import ReportWindow
from app.experiments.shadow import ShadowRunner
from app.experiments.state import Experiments
from app.gpu import register_gpu_collector
from app.metrics import Metrics
from app.observing import Observer
from app.service import GenerationService
from app.settings import Settings
from app.tenancy.keys import KeyRing
from app.tenancy.layer import LimitedBackend
from app.tenancy.limits import Limiter, create_limiter

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    register_gpu_collector(metrics.registry)
    variants = settings.all_variants()
    backends: dict[str, Backend] = {
        variant.name: create_backend(variant, metrics) for variant in variants
    }
    cache = _create_cache(settings)
    served: dict[str, Backend] = dict(backends)
    if cache is not None:
        served = {
            v.name: CachingBackend(backends[v.name], cache, v.cache_ttl_s, metrics)
            for v in variants
        }
    keys: KeyRing | None = None
    limiter: Limiter | None = None
    if settings.auth != "off":
        keys = KeyRing(settings.keys, settings.redis_url, settings.experiment_sync_interval_s)
        limiter = create_limiter(
            settings.redis_url, settings.rate_limits, on_fault=metrics.rate_limit_errors_total.inc
        )
        served = {name: LimitedBackend(b, limiter, metrics) for name, b in served.items()}
    experiments = Experiments(
        settings.all_experiments(), settings.redis_url, settings.experiment_sync_interval_s
    )
    window = ReportWindow(settings.report_window_s)
    shadows = ShadowRunner(settings.shadow, metrics, window)

    draining = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[Backend] = []
        restore_sigterm = drain_on_sigterm(draining, settings.drain_s)
        try:
            for backend in served.values():
                await backend.start()
                started.append(backend)
            await experiments.start()
            if keys is not None and limiter is not None:
                await keys.start()
                await limiter.start()
            # What start-up made (the app, its models and libraries: ~100k objects) lives as
            # long as the process: out of the collector's sight, a full collection scans
            # only what requests made since, rather than pausing every request in flight for
            # tens of milliseconds (BENCHMARKS.md, "Overhead as the field measures it").
            gc.collect()
            gc.freeze()
            yield
        finally:
            gc.unfreeze()  # a process that goes on (tests) may collect this app's cycles
            restore_sigterm()
            await shadows.close()
            await experiments.close()
            if keys is not None:
                await keys.close()
            for backend in reversed(started):
                await backend.close()
            if limiter is not None:
                await limiter.close()
            if cache is not None:
                await cache.close()

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:  # FastAPI >= 0.165
        # Our own Prometheus metrics cover what FastAPI's OpenTelemetry hooks would, and
        # their per-request check alone showed in a relayed request's CPU (BENCHMARKS.md).
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="model-gateway", version="0.1.0", lifespan=lifespan, **options)
    app.state.settings = settings
    app.state.draining = draining
    app.state.metrics = metrics
    app.state.keys = keys
    app.state.limiter = limiter
    app.state.service = GenerationService(
        backends, served, experiments, Observer(metrics, window), window, shadows
    )
    # The routes that generate first: the router tries routes in order.
    routers = (openai.generation_router, tgi.router, openai.router, health.router, admin.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    # Built now, not at the first /docs: FastAPI resolves included routes lazily, and this
    # is where a FastRoute given a dependency by its inclusion refuses it.
    app.openapi()
    endpoints = {r.path for router in routers for r in router.routes if isinstance(r, APIRoute)}
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        endpoints=endpoints,
        bodies=BodyReaders(
            settings.max_request_body_bytes, settings.body_timeout_s, settings.max_body_readers
        ),
        request_timeout_s=settings.request_timeout_s,
        keys=keys,
        key_required=settings.auth == "required",
        # /health, /ready, /ping and /metrics stay open (load balancers, Prometheus).
        protected={"/v1/models"}
        | {
            r.path
            for r in (*openai.generation_router.routes, *tgi.router.routes)
            if isinstance(r, APIRoute)
        },
    )
    return app


def drain_on_sigterm(draining: asyncio.Event, drain_s: float) -> Callable[[], None]:
    """On SIGTERM, set `draining` (/ready fails, requests are still served) and pass the
    signal on to the server after `drain_s`: it then stops taking connections and waits for
    the requests in flight. A second SIGTERM passes on at once. Where no handler can be set
    (not the main thread), the server stops as it would without this. Returns what puts the
    server's handler back."""
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    server_handler = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL
    signalled = False

    def restore() -> None:
        signal.signal(signal.SIGTERM, server_handler)

    def stop() -> None:
        restore()
        signal.raise_signal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        if signalled:
            loop.call_soon_threadsafe(stop)
            return
        signalled = True
        logger.info("SIGTERM: draining for %.0f s (/ready fails, requests are served)", drain_s)
        loop.call_soon_threadsafe(draining.set)
        loop.call_soon_threadsafe(loop.call_later, drain_s, stop)

    signal.signal(signal.SIGTERM, on_sigterm)
    return restore


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
