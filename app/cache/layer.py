"""`CachingBackend`: a Backend around a Backend. A deterministic request is answered from the
cache, or joins an identical generation in flight, or starts one that later identical
requests join and whose result is stored. Each request's events start with a `CacheLookup`
saying which; faults of the cache only cost the lookup (the request is generated)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from app.backends import Backend, BackendLayer
from app.cache.coalescing import Flight, Published
from app.cache.store import CachedGeneration, CacheError, ResponseCache, cache_key, is_cacheable
from app.domain import (
    BackendEvent,
    CacheLookup,
    Generation,
    PreparedRequest,
    RequestContext,
    TokenEvent,
)
from app.metrics import Metrics

logger = logging.getLogger(__name__)


class CachingBackend(BackendLayer):
    def __init__(
        self, inner: Backend, cache: ResponseCache, ttl_s: float, metrics: Metrics
    ) -> None:
        super().__init__(inner)
        self._cache = cache
        self._ttl_s = ttl_s
        self._flights: dict[str, Flight] = {}
        self._lookups = {
            result: metrics.cache_requests_total.labels(inner.name, result)
            for result in ("hit", "miss", "error", "bypass")
        }  # created now: zeros rather than no data on dashboards
        self._coalesced = metrics.cache_coalesced_total.labels(inner.name)

    async def generate(
        self, prepared: PreparedRequest, context: RequestContext
    ) -> AsyncIterator[BackendEvent]:
        request = prepared.request
        if not is_cacheable(request.sampling) or context.cache_control.no_cache:
            self._lookups["bypass"].inc()
            yield BYPASS
            async for event in self._inner.generate(prepared, context):
                yield event
            return
        key_of = (self.identity, prepared.prompt, prepared.max_tokens, request.stop,
                  request.sampling, prepared.extra)  # fmt: skip
        # A long prompt's key (its JSON, hashed) is made off the event loop, as its tokens are.
        key = (
            await asyncio.to_thread(cache_key, *key_of)
            if request.long_prompt
            else cache_key(*key_of)
        )
        flight = self._flights.get(key)
        if flight is not None:
            self._coalesced.inc()
        else:
            flight = self._fly(prepared, context, key, store=not context.cache_control.no_store)
        async for event in flight.join():
            yield event

    def _fly(
        self, prepared: PreparedRequest, context: RequestContext, key: str, *, store: bool
    ) -> Flight:
        """One lookup-then-generation for `key`, which identical requests join until it ends;
        a generated result is stored (if `store`)."""
        cache = self._cache

        async def lookup_or_generate() -> AsyncIterator[BackendEvent]:
            try:
                hit = await cache.get(key)
            except CacheError as exc:
                logger.warning("request %s: cache lookup failed: %s", context.request_id, exc)
                self._lookups["error"].inc()
                yield ERROR
                hit = None
            else:
                self._lookups["miss" if hit is None else "hit"].inc()
                yield MISS if hit is None else HIT
            if hit is not None:
                for token in hit.tokens:
                    yield token
                yield hit.generation
                return
            async for event in self._inner.generate(prepared, context):
                yield event

        async def done(history: list[Published]) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            final = history[-1] if history else None
            if not store or not isinstance(final, Generation) or history[0] == HIT:
                return
            tokens = tuple(e for e in history if isinstance(e, TokenEvent))
            try:
                await cache.set(key, CachedGeneration(final, tokens), self._ttl_s)
            except CacheError as exc:
                logger.warning("storing a response in the cache failed: %s", exc)
                self._lookups["error"].inc()

        flight = Flight(lookup_or_generate(), done)
        self._flights[key] = flight
        return flight


HIT, MISS, ERROR, BYPASS = (CacheLookup(r) for r in ("hit", "miss", "error", "bypass"))
