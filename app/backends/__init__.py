"""Backends: where a variant's generations come from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.metrics import Metrics
from app.protocol import GenerationEvent, GenerationRequest, PreparedRequest
from app.settings import VariantSettings


class Backend(Protocol):
    name: str  # the variant it serves
    kind: str  # the `backend` label of metrics
    identity: str  # what produces the output (model, weights, compute type): the cache key
    ready: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check the request against the model and resolve it; raises `GatewayError`."""
        ...

    def generate(self, prepared: PreparedRequest) -> AsyncIterator[GenerationEvent]:
        """Token events, then one `Generation`; or a `GatewayError` (overload at the first
        step, engine faults and deadlines later)."""
        ...


def create_backend(variant: VariantSettings, metrics: Metrics) -> Backend:
    if variant.backend == "openai":
        from app.backends.openai import OpenAIBackend

        return OpenAIBackend(variant, metrics)
    from app.backends.ctranslate2 import CTranslate2Backend

    return CTranslate2Backend(variant, metrics)
