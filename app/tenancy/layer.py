"""`LimitedBackend`: a Backend around a Backend (the cache layer, or the engine itself). A
request that came with a key is admitted against the key's limits before it reaches the
cache or a queue, its prompt tokens charged; when it ends, what it really used is reconciled
and counted, off the request's path. Requests without a key pass untouched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from app.backends import Backend, BackendLayer
from app.domain import (
    BackendEvent,
    Generation,
    PreparedRequest,
    RateLimitedError,
    RequestContext,
)
from app.metrics import Metrics
from app.tenancy.limits import Limiter


class LimitedBackend(BackendLayer):
    def __init__(self, inner: Backend, limiter: Limiter, metrics: Metrics) -> None:
        super().__init__(inner)
        self._limiter = limiter
        self._metrics = metrics
        self._releases: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=2)
        await super().close()

    async def generate(
        self, prepared: PreparedRequest, context: RequestContext
    ) -> AsyncIterator[BackendEvent]:
        tenant = context.tenant
        if tenant is None:
            async for event in self._inner.generate(prepared, context):
                yield event
            return
        # Known on admission where the backend tokenizes; an upstream's count comes with
        # its answer and is reconciled then.
        charged = len(prepared.prompt) if isinstance(prepared.prompt, list) else 0
        hold_s = max(1.0, context.deadline - time.monotonic())
        try:
            quota = await self._limiter.admit(tenant, context.request_id, charged, hold_s)
        except RateLimitedError as exc:
            self._metrics.key_rejections_total.labels(tenant.name, exc.reason).inc()
            raise
        model = prepared.request.model
        self._metrics.key_requests_total.labels(tenant.name, model).inc()
        used: Generation | None = None
        try:
            if quota is not None:
                yield quota
            async for event in self._inner.generate(prepared, context):
                if isinstance(event, Generation):
                    used = event
                yield event
        finally:
            prompt = used.prompt_tokens if used is not None else charged
            completion = used.completion_tokens if used is not None else 0
            tokens = self._metrics.key_tokens_total
            tokens.labels(tenant.name, model, "prompt").inc(prompt)
            tokens.labels(tenant.name, model, "completion").inc(completion)
            self._spawn(
                self._limiter.release(tenant, context.request_id, charged, prompt, completion)
            )

    def _spawn(self, release: Coroutine[Any, Any, None]) -> None:
        """Off the request's path: its reply need not wait for Redis."""
        task = asyncio.create_task(release)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
