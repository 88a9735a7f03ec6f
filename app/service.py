"""Gateway.route() and Gateway.handle(): the data path from a validated request to its events.

1. route: the variant that answers (sticky A/B split) and the shadows that get a copy
2. the backend checks and resolves the request (prompt tokens, token budget)
3. cacheable requests: the cache, then a generation already in flight, then a new one
   that later identical requests join and whose result is stored
4. metrics on the way out (TTFT, inter-token latency, tokens), the request's outcome for
   the experiment report, and the primary's side of each shadow pair
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from app.backends import Backend
from app.cache import CachedGeneration, CacheError, ResponseCache, cache_key, is_cacheable
from app.coalescing import Flight
from app.coalescing import Outcome as FlightOutcome
from app.experiments import Experiments, Route
from app.metrics import Metrics
from app.protocol import (
    CacheControl,
    GatewayError,
    Generation,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    PreparedRequest,
    ReplyInfo,
    TokenEvent,
    UpstreamError,
)
from app.report import Outcome, ReportWindow
from app.shadow import ShadowRunner

logger = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        metrics: Metrics,
        experiments: Experiments,
        window: ReportWindow,
        shadows: ShadowRunner,
        cache: ResponseCache | None = None,
        cache_ttl_s: Mapping[str, float] | None = None,
    ) -> None:
        self._backends = dict(backends)
        self._metrics = metrics
        self.experiments = experiments
        self.window = window
        self._shadows = shadows
        self._cache = cache
        self._cache_ttl_s = dict.fromkeys(backends, 3600.0) | dict(cache_ttl_s or {})
        self._flights: dict[str, Flight] = {}
        if cache is not None:  # zeros rather than no data on dashboards
            for name in self._backends:
                metrics.cache_coalesced_total.labels(name)
                for result in ("hit", "miss", "error", "bypass"):
                    metrics.cache_requests_total.labels(name, result)

    def model_names(self) -> list[str]:
        return self.experiments.names()

    def default_model(self) -> str:
        """The model of APIs that name none (TGI, SageMaker): the first configured."""
        return self.experiments.names()[0]

    def ready(self) -> bool:
        """Every variant that answers requests is ready. Shadows and variants without weight
        do not count: a dead shadow must not take the gateway out of its load balancer."""
        experiments = self.experiments
        return all(
            self._backends[variant].ready
            for name in experiments.names()
            for variant, weight in experiments.state(name).weights.items()
            if weight > 0
        )

    def route(self, model: str, user_key: str | None, forced_variant: str | None) -> Route:
        """Raises if the model is unknown or the forced variant not allowed."""
        return self.experiments.route(model, user_key, forced_variant)

    async def handle(
        self,
        request: GenerationRequest,
        route: Route,
        arrived_at: float,
        cache_control: CacheControl,
    ) -> AsyncIterator[GenerationEvent]:
        """Token events, then one `Generation`. Errors are raised before the first event
        when they concern the request, later only for faults (engine, deadline)."""
        pairs = []
        for shadow in route.shadows:
            copy = self._shadow_copy(request, route, shadow, arrived_at)
            pair = self._shadows.launch(route.experiment, request, shadow, copy)
            if pair is not None:
                pairs.append(pair)
        outcome = Outcome(route.variant)
        try:
            async for event in self._observed(request, route, arrived_at, cache_control, outcome):
                yield event
        finally:
            self.window.add(route.experiment, outcome)
            for pair in pairs:
                pair.primary_done(outcome)

    async def _shadow_copy(
        self, request: GenerationRequest, route: Route, shadow: str, arrived_at: float
    ) -> Outcome:
        copy = replace(request, info=ReplyInfo(), stream=False)
        outcome = Outcome(shadow)
        shadow_route = Route(route.experiment, shadow)
        # Straight to the shadow's backend: its latency is what is being compared.
        no_cache = CacheControl(no_cache=True, no_store=True)
        try:
            async for _ in self._observed(copy, shadow_route, arrived_at, no_cache, outcome):
                pass
        except GatewayError:
            pass  # recorded in `outcome`
        except Exception as exc:
            logger.exception("shadow %s of request %s failed", shadow, request.request_id)
            outcome.status, outcome.error = "error", str(exc)
        finally:
            self.window.add(route.experiment, outcome)
        return outcome

    async def _observed(
        self,
        request: GenerationRequest,
        route: Route,
        arrived_at: float,
        cache_control: CacheControl,
        outcome: Outcome,
    ) -> AsyncIterator[GenerationEvent]:
        """The generation's events, with metrics taken on the way; `outcome` says how it went."""
        backend = self._backends[route.variant]
        try:
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
                else:
                    # Complete before the yield: a consumer may stop at the final event.
                    outcome.status = "ok"
                    outcome.ttft_s, outcome.cache = request.info.ttft_s, request.info.cache
                    outcome.latency_s = time.monotonic() - arrived_at
                    outcome.text = event.text
                    outcome.finish_reason = event.finish_reason
                    outcome.completion_tokens = event.completion_tokens
                    if generated_here:
                        self._count_tokens(backend, event)
                yield event
        except GatewayError as exc:
            client_fault = isinstance(exc, InvalidRequestError) or (
                isinstance(exc, UpstreamError) and exc.status < 500
            )
            outcome.status = "client_error" if client_fault else "error"
            outcome.error = exc.message
            raise
        finally:
            outcome.ttft_s = request.info.ttft_s
            outcome.cache = request.info.cache

    async def _source(
        self, backend: Backend, prepared: PreparedRequest, cache_control: CacheControl
    ) -> tuple[AsyncIterator[GenerationEvent], bool]:
        """Where this request's events come from, and whether this request is the one
        generating them (token metrics count each generation once)."""
        request = prepared.request
        if self._cache is None:
            return backend.generate(prepared), True
        if not is_cacheable(request.sampling) or cache_control.no_cache:
            request.info.cache = "bypass"
            self._metrics.cache_requests_total.labels(backend.name, "bypass").inc()
            return backend.generate(prepared), True
        key = cache_key(backend.identity, prepared.prompt, prepared.max_tokens, request.stop,
                        request.sampling, prepared.extra)  # fmt: skip
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.cache_coalesced_total.labels(backend.name).inc()
        else:
            flight = self._fly(backend, prepared, key, store=not cache_control.no_store)
        return self._reporting_cache_result(flight, request), False

    async def _reporting_cache_result(
        self, flight: Flight, request: GenerationRequest
    ) -> AsyncIterator[GenerationEvent]:
        async for event in flight.join():
            request.info.cache = "hit" if flight.from_cache else "miss"
            yield event

    def _fly(self, backend: Backend, prepared: PreparedRequest, key: str, *, store: bool) -> Flight:
        """One lookup-then-generation for `key`, which identical requests join until it ends;
        a generated result is stored (if `store`)."""
        cache = self._cache
        assert cache is not None
        counter = self._metrics.cache_requests_total

        async def lookup_or_generate() -> AsyncIterator[GenerationEvent]:
            try:
                hit = await cache.get(key)
            except CacheError as exc:
                logger.warning("request %s: cache lookup failed: %s", prepared.request.request_id,
                               exc)  # fmt: skip
                counter.labels(backend.name, "error").inc()
                hit = None
            else:
                counter.labels(backend.name, "hit" if hit else "miss").inc()
            if hit is not None:
                flight.from_cache = True
                for token in hit.tokens:
                    yield token
                yield hit.generation
                return
            async for event in backend.generate(prepared):
                yield event

        async def done(history: list[FlightOutcome]) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            final = history[-1] if history else None
            if flight.from_cache or not isinstance(final, Generation):
                return
            self._count_tokens(backend, final)
            if not store:
                return
            tokens = tuple(e for e in history if isinstance(e, TokenEvent))
            try:
                await cache.set(
                    key, CachedGeneration(final, tokens), self._cache_ttl_s[backend.name]
                )
            except CacheError as exc:
                logger.warning("storing a response in the cache failed: %s", exc)
                counter.labels(backend.name, "error").inc()

        flight = Flight(lookup_or_generate(), done)
        self._flights[key] = flight
        return flight

    def _count_tokens(self, backend: Backend, generation: Generation) -> None:
        labels = (backend.name, backend.kind)
        self._metrics.prompt_tokens_total.labels(*labels).inc(generation.prompt_tokens)
        self._metrics.generation_tokens_total.labels(*labels).inc(generation.completion_tokens)
