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
