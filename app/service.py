"""Gateway.handle(): the data path from a validated request to a backend's events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from app.backends import Backend
from app.metrics import Metrics
from app.protocol import (
    Generation,
    GenerationEvent,
    GenerationRequest,
    ModelNotFoundError,
    TokenEvent,
)


class Gateway:
    def __init__(self, backends: Mapping[str, Backend], metrics: Metrics) -> None:
        self._backends = dict(backends)
        self._metrics = metrics

    def model_names(self) -> list[str]:
        return list(self._backends)

    def default_model(self) -> str:
        """The model of APIs that name none (TGI, SageMaker): the first configured."""
        return next(iter(self._backends))

    def ready(self) -> bool:
        return all(backend.ready() for backend in self._backends.values())

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
        self, request: GenerationRequest, arrived_at: float
    ) -> AsyncIterator[GenerationEvent]:
        """Token events, then one `Generation`. Errors are raised before the first event
        when they concern the request, later only for faults (engine, deadline)."""
        backend = self._backends[self.variant_for(request)]
        labels = (backend.name, backend.kind)
        ttft = self._metrics.time_to_first_token_seconds.labels(*labels)
        itl = self._metrics.inter_token_latency_seconds.labels(*labels)
        last_token_at: float | None = None
        async for event in backend.generate(request):
            if isinstance(event, TokenEvent):
                now = time.monotonic()
                if last_token_at is None:
                    request.timings.ttft_s = now - arrived_at
                    ttft.observe(request.timings.ttft_s)
                else:
                    itl.observe(now - last_token_at)
                last_token_at = now
            elif isinstance(event, Generation):
                self._metrics.prompt_tokens_total.labels(*labels).inc(event.prompt_tokens)
                self._metrics.generation_tokens_total.labels(*labels).inc(event.completion_tokens)
            yield event
