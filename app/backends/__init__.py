"""Backends: where a variant's generations come from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Protocol

from app.domain import (
    BackendEvent,
    GenerationRequest,
    InvalidRequestError,
    PreparedRequest,
    RequestContext,
)
from app.metrics import Metrics
from app.settings import VariantSettings


class Backend(Protocol):
    name: str  # the variant it serves
    kind: str  # the `backend` label of metrics

    @property
    def identity(self) -> str:
        """What produces the output (model, weights, compute type): part of the cache key."""
        ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check the request against the model and resolve it; raises `GatewayError`."""
        ...

    def generate(
        self, prepared: PreparedRequest, context: RequestContext
    ) -> AsyncIterator[BackendEvent]:
        """Token events, then one `Generation`, maybe preceded by what the reply's timings
        need (`Scheduled`, `CacheLookup`); or a `GatewayError` (overload at the first step,
        engine faults and deadlines later). An engine counts the tokens it generates."""
        ...


def refuse_unsupported(
    request: GenerationRequest, unsupported: Collection[str], where: str
) -> None:
    """A 400 naming the first of the request's options that the backend cannot honour, and
    the backend (`where`: its variant and engine): never a field silently dropped."""
    for name in request.options:
        if name in unsupported:
            raise InvalidRequestError(f"{name} is not supported by {where}", param=name)


class BackendLayer:
    """A Backend around a Backend (the cache layer, the limits layer): the same variant,
    model and lifecycle as the one inside; a layer brings its own `generate`."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.name, self.kind = inner.name, inner.kind

    @property
    def identity(self) -> str:
        return self._inner.identity

    @property
    def ready(self) -> bool:
        return self._inner.ready

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return self._inner.prepare(request)


def create_backend(variant: VariantSettings, metrics: Metrics) -> Backend:
    if variant.backend == "openai":
        from app.backends.openai import OpenAIBackend

        return OpenAIBackend(variant, metrics)
    from app.backends.ctranslate2.kernels import choose_cpu_kernels

    choose_cpu_kernels()  # before CTranslate2 is loaded: it reads the choice once
    from app.backends.ctranslate2.backend import CTranslate2Backend

    return CTranslate2Backend(variant, metrics)
