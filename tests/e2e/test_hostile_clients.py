"""The real default model behind a live server, under inputs meant to stall it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

MODEL = "smollm2-135m-instruct"


def test_a_huge_prompt_does_not_stall_the_server(server: str) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 23_000  # about 1 MB
    waits: list[float] = []
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server, timeout=10) as client:
        client.get("/health")  # connected before the clock starts
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        big = pool.submit(httpx.post, server + "/v1/completions", json=body, timeout=60)
        while not big.done():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.005)
        reply = big.result()
    assert reply.status_code == 400  # longer than the model's context
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    # Tokenized on the event loop it held /health up for 0.4-0.8 s.
    assert len(waits) >= 10, waits
    assert max(waits) < 0.2, sorted(waits)[-5:]
