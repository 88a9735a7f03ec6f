"""Gateway.handle(): the data path from a validated request to its events.

1. the variant (its backend) for the requested model
2. the backend checks and resolves the request (prompt tokens, token budget)
3. cacheable requests: the cache, then a generation already in flight, then a new one
   that later identical requests join and whose result is stored
4. metrics on the way out (TTFT, inter-token latency, tokens)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

from app.backends import Backend
from app.cache import CachedGeneration, CacheError, ResponseCache, cache_key, is_cacheable
from app.coalescing import Flight, Outcome
from app.metrics import Metrics
from app.protocol import (
    CacheControl,
    Generation,
    GenerationEvent,
    GenerationRequest,
    ModelNotFoundError,
    PreparedRequest,
    TokenEvent,
)

logger = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        metrics: Metrics,
        cache: ResponseCache | None = None,
        cache_ttl_s: Mapping[str, float] | None = None,
    ) -> None:
        self._backends = dict(backends)
        self._metrics = metrics
        self._cache = cache
        self._cache_ttl_s = dict(cache_ttl_s or {})
        self._flights: dict[str, Flight] = {}

    def model_names(self) -> list[str]:
        return list(self._backends)

    def default_model(self) -> str:
        """The model of APIs that name none (TGI, SageMaker): the first configured."""
        return next(iter(self._backends))

    def ready(self) -> bool:
        return all(backend.ready for backend in self._backends.values())

    def variant_for(self, request: GenerationRequest) -> str:
        """The variant that will serve `request`; raises if its model is unknown."""
        if request.model not in self._backends:
            raise ModelNotFoundError(
                f"The model {request.model!r} does not exist; "
                f"available: {', '.join(self._backends)}",
                param="model",
            )
        return request.model

    async def handle(
        self,
        request: GenerationRequest,
        arrived_at: float,
        cache_control: CacheControl,
    ) -> AsyncIterator[GenerationEvent]:
        """Token events, then one `Generation`. Errors are raised before the first event
        when they concern the request, later only for faults (engine, deadline)."""
        backend = self._backends[self.variant_for(request)]
        prepared = backend.prepare(request)
        events, generated_here = await self._source(backend, prepared, cache_control)
        labels = (backend.name, backend.kind)
        ttft = self._metrics.time_to_first_token_seconds.labels(*labels)
        itl = self._metrics.inter_token_latency_seconds.labels(*labels)
        last_token_at: float | None = None
        async for event in events:
            if isinstance(event, TokenEvent):
                now = time.monotonic()
                if last_token_at is None:
                    request.info.ttft_s = now - arrived_at
                    ttft.observe(request.info.ttft_s)
                else:
                    itl.observe(now - last_token_at)
                last_token_at = now
            elif generated_here:
                self._metrics.prompt_tokens_total.labels(*labels).inc(event.prompt_tokens)
                self._metrics.generation_tokens_total.labels(*labels).inc(event.completion_tokens)
            yield event

    async def _source(
        self, backend: Backend, prepared: PreparedRequest, cache_control: CacheControl
    ) -> tuple[AsyncIterator[GenerationEvent], bool]:
        """Where this request's events come from, and whether they are generated for it
        (rather than replayed from the cache or shared with an identical request)."""
        request = prepared.request
        if self._cache is None:
            return backend.generate(prepared), True
        counter = self._metrics.cache_requests_total
        if not is_cacheable(request.sampling):
            request.info.cache = "bypass"
            counter.labels(backend.name, "bypass").inc()
            return backend.generate(prepared), True
        key = cache_key(backend.identity, prepared.prompt_ids, prepared.max_tokens, request.stop,
                        request.sampling)  # fmt: skip
        if cache_control.no_cache:
            request.info.cache = "bypass"
            counter.labels(backend.name, "bypass").inc()
            if cache_control.no_store:
                return backend.generate(prepared), True
            return self._fly(backend, prepared, join_key=None, store_key=key).join(), True
        request.info.cache = "miss"
        try:
            hit = await self._cache.get(key)
        except CacheError as exc:
            logger.warning("request %s: cache lookup failed: %s", request.request_id, exc)
            counter.labels(backend.name, "error").inc()
        else:
            counter.labels(backend.name, "hit" if hit else "miss").inc()
            if hit is not None:
                request.info.cache = "hit"
                return _replay(hit), False
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.cache_coalesced_total.labels(backend.name).inc()
            return flight.join(), False
        store_key = None if cache_control.no_store else key
        return self._fly(backend, prepared, join_key=key, store_key=store_key).join(), True

    def _fly(
        self,
        backend: Backend,
        prepared: PreparedRequest,
        *,
        join_key: str | None,
        store_key: str | None,
    ) -> Flight:
        """Start a generation that identical requests can join (under `join_key`) and whose
        result is stored (under `store_key`)."""

        async def done(history: list[Outcome]) -> None:
            if join_key is not None and self._flights.get(join_key) is flight:
                del self._flights[join_key]
            if store_key is None or self._cache is None or not history:
                return
            final = history[-1]
            if not isinstance(final, Generation):
                return
            tokens = tuple(e for e in history if isinstance(e, TokenEvent))
            ttl_s = self._cache_ttl_s.get(backend.name, 3600.0)
            try:
                await self._cache.set(store_key, CachedGeneration(final, tokens), ttl_s)
            except CacheError as exc:
                logger.warning("storing a response in the cache failed: %s", exc)
                self._metrics.cache_requests_total.labels(backend.name, "error").inc()

        flight = Flight(backend.generate(prepared), done)
        if join_key is not None:
            self._flights[join_key] = flight
        return flight


async def _replay(hit: CachedGeneration) -> AsyncIterator[GenerationEvent]:
    for token in hit.tokens:
        yield token
    yield hit.generation
