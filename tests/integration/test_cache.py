"""The response cache and coalescing through the app, with the memory cache and a real Redis:
hits, bypass, TTL, stream replay, sharing across APIs, and Redis failing in every way."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AppFactory
from tests.integration.test_api import sse_events
from tests.live_server import eventually
from tests.redis_server import RedisServer

GREEDY = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 12, "temperature": 0}


@pytest.fixture(params=["memory", "redis"])
async def client(
    request: pytest.FixtureRequest, make_client: AppFactory
) -> AsyncIterator[httpx.AsyncClient]:
    settings: dict[str, Any] = {}
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        settings["redis_url"] = server.url
    async with make_client(**settings) as client:
        yield client


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def generations(client: httpx.AsyncClient) -> float:
    return await metric(client, "model_gateway_engine_sequences_total", outcome="finished")


async def post(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    reply = await client.post("/v1/completions", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply


async def test_hit_miss_bypass_and_no_store(client: httpx.AsyncClient) -> None:
    before = await generations(client)
    first = await post(client, GREEDY)
    assert first.headers["x-cache"] == "miss"
    second = await post(client, GREEDY)
    assert second.headers["x-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert await generations(client) == before + 1  # the hit did not reach the engine

    bypass = await post(client, GREEDY, **{"Cache-Control": "no-cache"})
    assert bypass.headers["x-cache"] == "bypass"
    assert await generations(client) == before + 2

    other = {**GREEDY, "prompt": "Batching requests"}
    assert (await post(client, other, **{"Cache-Control": "no-store"})).headers["x-cache"] == "miss"
    assert (await post(client, other)).headers["x-cache"] == "miss"  # nothing was stored
    assert (await post(client, other)).headers["x-cache"] == "hit"
    assert await metric(client, "model_gateway_cache_requests_total", result="hit") == 2
    assert await metric(client, "model_gateway_cache_requests_total", result="bypass") == 1


async def test_only_deterministic_requests_are_cached(client: httpx.AsyncClient) -> None:
    sampled = {**GREEDY, "temperature": 0.9}
    assert (await post(client, sampled)).headers["x-cache"] == "bypass"
    assert (await post(client, sampled)).headers["x-cache"] == "bypass"
    seeded = {**sampled, "seed": 1234}
    first = await post(client, seeded)
    assert first.headers["x-cache"] == "miss"
    again = await post(client, seeded)
    assert again.headers["x-cache"] == "hit"
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


async def test_streaming_hit_replays_the_live_stream(client: httpx.AsyncClient) -> None:
    body = {**GREEDY, "stream": True, "stream_options": {"include_usage": True}}
    live = await client.post("/v1/completions", json=body)
    replay = await client.post("/v1/completions", json=body)
    assert (live.headers["x-cache"], replay.headers["x-cache"]) == ("miss", "hit")

    def shape(reply: httpx.Response) -> list[Any]:
        return [
            e if e == "[DONE]" else {k: v for k, v in e.items() if k not in ("id", "created")}
            for e in sse_events(reply.text)
        ]

    assert shape(replay) == shape(live)
    whole = await post(client, GREEDY)  # the non-streaming form shares the entry
    assert whole.headers["x-cache"] == "hit"


async def test_same_generation_through_another_api_shares_the_entry(
    client: httpx.AsyncClient,
) -> None:
    openai = await post(client, {**GREEDY, "prompt": "Once upon", "max_tokens": 6})
    tgi = await client.post(
        "/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 6}}
    )
    assert tgi.headers["x-cache"] == "hit"
    assert tgi.json()["generated_text"] == openai.json()["choices"][0]["text"]
    invocations = await client.post(
        "/invocations", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 6}}
    )
    assert invocations.headers["x-cache"] == "hit"
    changed = await client.post(
        "/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 7}}
    )
    assert changed.headers["x-cache"] == "miss"


async def test_entries_expire_after_their_ttl(make_client: AppFactory) -> None:
    async with make_client(variant={"cache_ttl_s": 0.5}) as client:
        stored_at = time.monotonic()
        assert (await post(client, GREEDY)).headers["x-cache"] == "miss"
        assert (await post(client, GREEDY)).headers["x-cache"] == "hit"
        async with asyncio.timeout(10):
            while (await post(client, GREEDY, **{"Cache-Control": "no-store"})).headers[
                "x-cache"
            ] == "hit":
                await asyncio.sleep(0.05)
        assert time.monotonic() - stored_at >= 0.5


async def test_values_over_the_size_limit_are_not_stored(make_client: AppFactory) -> None:
    async with make_client(cache={"max_value_bytes": 64}) as client:
        assert (await post(client, GREEDY)).headers["x-cache"] == "miss"
        assert (await post(client, GREEDY)).headers["x-cache"] == "miss"


async def test_identical_concurrent_requests_share_one_generation(
    client: httpx.AsyncClient,
) -> None:
    body = {**GREEDY, "prompt": "Concurrent", "max_tokens": 40}
    before = await generations(client)
    replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(100)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1
    assert await generations(client) == before + 1
    assert await metric(client, "model_gateway_cache_coalesced_total") == 99


async def test_redis_killed_and_restarted(
    make_client: AppFactory, redis_server: RedisServer
) -> None:
    async with make_client(redis_url=redis_server.url, cache={"breaker_reset_s": 0.2}) as client:
        assert (await post(client, GREEDY)).headers["x-cache"] == "miss"
        redis_server.kill()
        for _ in range(5):  # served uncached, no error reaches the client
            reply = await post(client, GREEDY)
            assert reply.headers["x-cache"] == "error"
        assert await metric(client, "model_gateway_cache_requests_total", result="error") >= 1
        redis_server.start()  # empty: the first request stores again, then hits
        async with asyncio.timeout(10):
            while (await post(client, GREEDY)).headers["x-cache"] != "hit":
                await asyncio.sleep(0.1)


async def test_frozen_redis_costs_at_most_its_timeout(
    make_client: AppFactory, redis_server: RedisServer
) -> None:
    cache = {"timeout_ms": 100, "breaker_failures": 2, "breaker_reset_s": 30}
    async with make_client(redis_url=redis_server.url, cache=cache) as client:
        await post(client, GREEDY)
        redis_server.freeze()
        try:
            durations = []
            for _ in range(6):
                started = time.monotonic()
                reply = await post(client, GREEDY)
                durations.append(time.monotonic() - started)
                assert reply.headers["x-cache"] == "error"
            # Lookup and store each wait at most the timeout until the breaker opens;
            # then Redis is not asked at all.
            assert max(durations) < 2.0, durations
            assert await metric(client, "model_gateway_cache_requests_total", result="error") >= 2
        finally:
            redis_server.thaw()


async def test_corrupt_or_foreign_values_are_ignored(
    make_client: AppFactory, redis_server: RedisServer
) -> None:
    async with make_client(redis_url=redis_server.url) as client:
        await post(client, GREEDY)
        store = redis_server.client()

        async def stored() -> bool:  # a result is stored after its reply has left
            return bool(store.keys("model-gateway:response:*"))

        await eventually(stored, 5, "the result stored")
        (key,) = store.keys("model-gateway:response:*")
        valid = json.loads(store.get(key))
        foreign_body = json.dumps({**valid, "body": {"not": "a completion"}}).encode()
        for garbage in (b"\x00\xffnot json", json.dumps({"version": 99}).encode(), b"[]",
                        foreign_body):  # fmt: skip
            store.set(key, garbage)
            reply = await post(client, GREEDY)
            assert reply.headers["x-cache"] == "error"
            assert reply.json()["choices"][0]["text"]

            async def replaced(garbage: bytes = garbage) -> bool:
                return store.get(key) != garbage

            await eventually(replaced, 5, "the result stored again")
        assert await metric(client, "model_gateway_cache_requests_total", result="error") == 4
        assert (await post(client, GREEDY)).headers["x-cache"] == "hit"
