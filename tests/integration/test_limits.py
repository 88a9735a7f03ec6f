"""Overload and deadlines through the real engine: 429 with Retry-After at once, 504 past
the deadline, and the server keeps serving afterwards."""

from __future__ import annotations

import asyncio

from tests.conftest import AppFactory

ONE_AT_A_TIME = {
    "inter_threads": 1,
    "batching": {"max_batch_size": 1, "max_queue_size": 1, "max_wait_ms": 0},
}


async def test_full_queue_answers_429_with_retry_after(make_client: AppFactory) -> None:
    async with make_client(variant=ONE_AT_A_TIME) as client:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": False}
        replies = await asyncio.gather(  # distinct prompts: identical ones would coalesce
            *(
                client.post("/v1/completions", json={**body, "prompt": f"Once {i}"})
                for i in range(8)
            )
        )
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 429}, statuses
        assert statuses.count(200) >= 1
        assert statuses.count(429) >= 5  # one runs, one waits, the rest are refused
        refused = next(r for r in replies if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"

        tgi = await asyncio.gather(
            *(
                client.post(
                    "/generate", json={"inputs": f"Once {i}", "parameters": {"max_new_tokens": 200}}
                )
                for i in range(8)
            )
        )
        assert 429 in {r.status_code for r in tgi}
        assert next(r for r in tgi if r.status_code == 429).json()["error_type"] == "overloaded"

        after = await client.post("/v1/completions", json={**body, "max_tokens": 2})
        assert after.status_code == 200


async def test_request_past_its_deadline_answers_504(make_client: AppFactory) -> None:
    variant = {"batching": {"max_wait_ms": 200, "arrival_gap_ms": 200}}
    async with make_client(variant=variant, request_timeout_s=0.05) as client:
        reply = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5}
        )
        assert reply.status_code == 504
        assert reply.json()["error"]["type"] == "timeout_error"
        reply = await client.post(
            "/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 5}}
        )
        assert reply.status_code == 504
        assert reply.json()["error_type"] == "timeout"
