"""Backends: where a variant's generations come from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.metrics import Metrics
from app.protocol import GenerationEvent, GenerationRequest
from app.settings import VariantSettings


class Backend(Protocol):
    name: str  # the variant it serves
    kind: str  # the `backend` label of metrics

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Token events, then one `Generation`; or a `GatewayError`, raised at the first
        step for anything wrong with the request (before any event)."""
        ...


def create_backend(variant: VariantSettings, metrics: Metrics) -> Backend:
    from app.backends.ctranslate2 import CTranslate2Backend

    return CTranslate2Backend(variant, metrics)
