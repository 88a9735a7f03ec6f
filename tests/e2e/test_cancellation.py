"""A client that leaves stops its sequence in the engine and frees its slot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import live_server, metric_value, wait_until

MODEL = "smollm2-135m-instruct"
LONG = {"model": MODEL, "prompt": "Here is a very long story about a dragon.", "temperature": 0}


@pytest.fixture(scope="module")
def one_slot_server(default_model: Path) -> Iterator[str]:
    variant = {
        "name": MODEL,
        "model_path": str(default_model),
        "inter_threads": 1,
        "batching": {"max_batch_size": 4},
    }
    with live_server(variants=[variant]) as base_url:
        yield base_url


def cancelled(base_url: str) -> float:
    return metric_value(
        base_url, "model_gateway_engine_sequences_total", variant=MODEL, outcome="cancelled"
    )


def test_stream_disconnect_stops_the_sequence(one_slot_server: str) -> None:
    before = cancelled(one_slot_server)
    body = {**LONG, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", one_slot_server + "/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        chunks = 0
        for line in reply.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break
    # The connection is closed: the engine must stop the sequence, not finish 4000 tokens.
    wait_until(lambda: cancelled(one_slot_server) == before + 1, 30, "the engine to cancel")
    quick = httpx.post(
        one_slot_server + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30
    )
    assert quick.status_code == 200


def test_non_streaming_disconnect_stops_the_sequence(one_slot_server: str) -> None:
    before = cancelled(one_slot_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            one_slot_server + "/v1/completions", json={**LONG, "max_tokens": 4000}, timeout=1.0
        )
    wait_until(lambda: cancelled(one_slot_server) == before + 1, 30, "the engine to cancel")


def test_waiter_leaving_a_shared_generation_leaves_the_other_served(one_slot_server: str) -> None:
    url = one_slot_server + "/v1/completions"
    body = {**LONG, "prompt": "Tell me about rivers.", "max_tokens": 120, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip

    def finished() -> float:
        return metric_value(
            one_slot_server, "model_gateway_engine_sequences_total", variant=MODEL,
            outcome="finished",
        )  # fmt: skip

    coalesced_before = metric_value(one_slot_server, "model_gateway_cache_coalesced_total")
    finished_before, cancelled_before = finished(), cancelled(one_slot_server)
    with (
        httpx.stream("POST", url, json=body, timeout=60) as first,
        httpx.stream("POST", url, json=body, timeout=60) as second,
    ):
        first_lines, second_lines = first.iter_lines(), second.iter_lines()
        assert next(line for line in first_lines if line.startswith("data: {"))
        assert next(line for line in second_lines if line.startswith("data: {"))
        first.close()  # one waiter leaves mid-generation
        usage = None
        for line in second_lines:
            if '"usage":{' in line:
                usage = line
        assert usage is not None
        assert '"completion_tokens":120' in usage
    assert metric_value(one_slot_server, "model_gateway_cache_coalesced_total") == (
        coalesced_before + 1
    )
    wait_until(lambda: finished() == finished_before + 1, 30, "the one generation to finish")
    assert cancelled(one_slot_server) == cancelled_before
