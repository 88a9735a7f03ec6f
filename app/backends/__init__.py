"""Backends: where a variant's generations come from."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Protocol

from app.metrics import Metrics
from app.protocol import GenerationEvent, GenerationRequest, PreparedRequest
from app.settings import VariantSettings


def _choose_ct2_cpu_kernels() -> None:
    """On Intel CPUs CTranslate2 multiplies int8 matrices with MKL, and there, with its
    AVX2/AVX-512 kernels preparing the operands, replies came out wrong: on a Xeon with
    AVX-512 VNNI, "What is the capital of France?" got "L'Étoile, la Marseillaise, ..." where
    float32 says Paris. Its generic kernels with the same MKL answer right at 0.84-0.90x the
    speed (BENCHMARKS.md); AMD CPUs use oneDNN and are not affected. CTranslate2 reads the
    variable once, at import: this runs first, since importing app.backends.ctranslate2
    imports this package before it. A CT2_FORCE_CPU_ISA of the user's own wins."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read(4096)
    except OSError:
        return
    if intel:
        os.environ.setdefault("CT2_FORCE_CPU_ISA", "GENERIC")


_choose_ct2_cpu_kernels()


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
