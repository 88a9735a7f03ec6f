"""The cache key changes with everything that changes the output, and nothing else."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app.cache.store import cache_key, is_cacheable
from app.domain import SamplingParams

BASE: dict[str, Any] = {
    "model_identity": "/models/m:abc123:int8",
    "prompt": [1, 2, 3],
    "max_tokens": 16,
    "stop": ("\n",),
    "sampling": SamplingParams(temperature=0.0),
}
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1)


def key(**changes: Any) -> str:
    return cache_key(**{**BASE, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"model_identity": "/models/m:def456:int8"},
        {"model_identity": "/models/m:abc123:float32"},
        {"prompt": [1, 2, 4]},
        {"prompt": [1, 2, 3, 3]},
        {"prompt": "1 2 3"},
        {"max_tokens": 17},
        {"stop": ("\n", "END")},
        {"stop": ()},
        {"sampling": SamplingParams(temperature=0.0, repetition_penalty=1.1)},
        {"sampling": SamplingParams(temperature=0.0, ignore_eos=True)},
        {"sampling": SAMPLED},
    ],
)
def test_output_changing_parameters_change_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


@pytest.mark.parametrize(
    "field", [{"temperature": 0.8}, {"top_p": 0.5}, {"top_k": 10}, {"seed": 2}]
)
def test_every_sampling_parameter_counts_when_sampling(field: dict[str, Any]) -> None:
    assert key(sampling=replace(SAMPLED, **field)) != key(sampling=SAMPLED)


def test_parameters_that_cannot_matter_do_not_change_the_key() -> None:
    greedy = key(sampling=SamplingParams(temperature=0.0))
    assert key(sampling=SamplingParams(temperature=0.0, top_p=0.3, top_k=5, seed=9)) == greedy
    assert key(sampling=SamplingParams(temperature=0.8, top_k=1)) == greedy  # top_k 1 is greedy
    assert key(stop=("b", "a")) == key(stop=("a", "b", "a"))


def test_keys_are_namespaced_and_versioned() -> None:
    assert key().startswith("model-gateway:response:v1:")


def test_only_deterministic_requests_are_cacheable() -> None:
    assert is_cacheable(SamplingParams(temperature=0.0))
    assert is_cacheable(SamplingParams(temperature=1.0, seed=3))
    assert not is_cacheable(SamplingParams(temperature=1.0))
