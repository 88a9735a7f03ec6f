"""A/B experiments and shadows through the app, on real variants (the tiny CTranslate2 model
loaded as several variants, and upstream servers that refuse or stall): sticky routing,
forced variants, shadow pairs compared and logged, a shadow that fails or stalls leaving the
primary alone, the admin API (token, live re-weighting, promotion, report), and two gateway
replicas sharing experiment changes through a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.domain import GenerationRequest, RequestContext, SamplingParams
from app.main import create_app
from app.settings import Settings
from tests.conftest import SHUTDOWN_TIMEOUT_S
from tests.integration.test_api import sse_events
from tests.integration.test_cache import metric
from tests.live_server import eventually, free_port
from tests.redis_server import RedisServer

TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
GREEDY = {"model": "chat", "prompt": "The quick brown", "max_tokens": 8, "temperature": 0}


class StallingUpstream:
    """An OpenAI-compatible server whose /health passes and whose generations never answer:
    a shadow that sleeps."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                self.requests += 1
                await asyncio.Event().wait()  # until the connection is dropped
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    async def __aenter__(self) -> StallingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


def streamed_text(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    return "".join(event["choices"][0]["text"] for event in events[:-1])


def experiment(tiny: Path, *variants: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {
        "name": "chat",
        "allow_variant_header": True,
        "variants": [
            {"backend": "ctranslate2", "model_path": tiny, **v}
            if "upstream" not in v
            else {"backend": "openai", **v}
            for v in variants
        ],
        **options,
    }


@asynccontextmanager
async def gateway(
    tiny: Path, *variants: dict[str, Any], experiment_options: dict[str, Any] | None = None,
    **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:  # fmt: skip
    settings.setdefault("admin_token", TOKEN)
    settings.setdefault("auth", "off")
    app = create_app(
        Settings(experiments=[experiment(tiny, *variants, **(experiment_options or {}))],
                 **settings)
    )  # fmt: skip
    async with (
        LifespanManager(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        yield client, app


AB = ({"name": "a", "weight": 50}, {"name": "b", "weight": 50})


async def complete(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    reply = await client.post("/v1/completions", json=GREEDY, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply


async def test_sticky_users_and_the_variant_in_every_reply(tiny_model_dir: Path) -> None:
    async with gateway(tiny_model_dir, *AB) as (client, _):
        seen: dict[str, set[str]] = {}
        for user in [f"user-{i}" for i in range(12)] * 2:
            body = {**GREEDY, "user": user}
            reply = await client.post("/v1/completions", json=body)
            assert reply.status_code == 200
            seen.setdefault(user, set()).add(reply.headers["x-variant"])
        assert all(len(variants) == 1 for variants in seen.values())  # sticky
        assert set().union(*seen.values()) == {"a", "b"}  # both in use
        by_header = {(await complete(client, **{"X-User-Id": "u1"})).headers["x-variant"]
                     for _ in range(4)}  # fmt: skip
        assert len(by_header) == 1
        tgi = await client.post("/generate", json={"inputs": "Hi", "parameters":
                                {"max_new_tokens": 2}}, headers={"X-User-Id": "u1"})  # fmt: skip
        assert tgi.headers["x-variant"] == by_header.pop()
        served = await metric(client, "model_gateway_requests_total", endpoint="/v1/completions")
        per_variant = [
            await metric(client, "model_gateway_requests_total", variant=v,
                         endpoint="/v1/completions")
            for v in ("a", "b")
        ]  # fmt: skip
        assert served == sum(per_variant) == 28
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "chat"


async def test_forcing_a_variant(tiny_model_dir: Path) -> None:
    async with gateway(tiny_model_dir, {"name": "a", "weight": 1}, {"name": "b", "weight": 0}
                       ) as (client, _):  # fmt: skip
        assert (await complete(client, **{"X-Variant": "b"})).headers["x-variant"] == "b"
        assert (await complete(client)).headers["x-variant"] == "a"
        reply = await client.post("/v1/completions", json=GREEDY, headers={"X-Variant": "zzz"})
        assert reply.status_code == 400
        assert "no variant 'zzz'" in reply.json()["error"]["message"]
    async with gateway(tiny_model_dir, *AB, experiment_options={"allow_variant_header": False}) as (
        client,
        _,
    ):
        reply = await client.post("/v1/completions", json=GREEDY, headers={"X-Variant": "b"})
        assert reply.status_code == 400
        assert "not enabled" in reply.json()["error"]["message"]


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_shadow_pair_is_compared_and_logged(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "shadow.jsonl"
    variants = ({"name": "a"}, {"name": "s", "shadow": {"sample_rate": 1.0}})
    async with gateway(tiny_model_dir, *variants, shadow={"log_path": log}) as (client, _):
        plain = await complete(client)
        streamed = await client.post("/v1/completions", json={**GREEDY, "stream": True})
        assert streamed.status_code == 200
        assert plain.headers["x-variant"] == "a"
        await eventually(lambda: asyncio.sleep(0, len(read_log(log)) == 2), 30, "two log lines")
        first = read_log(log)[0]
        assert first["request_id"] == plain.headers["x-request-id"]
        assert first["experiment"] == "chat"
        assert first["primary"]["variant"] == "a"
        assert first["shadow"]["variant"] == "s"
        # The same weights, greedy: the same output.
        assert first["primary"]["text"] == plain.json()["choices"][0]["text"]
        assert first["shadow"]["text"] == first["primary"]["text"]
        assert first["outcome"] == "match"
        assert first["similarity"] == 1.0
        assert first["shadow"]["latency_s"] > 0
        # A generated (not cached) primary: timings on both sides, and their differences.
        assert first["primary"]["cache"] == "miss"
        assert first["primary"]["ttft_s"] > 0
        assert first["latency_diff_s"] is not None
        assert first["ttft_diff_s"] is not None
        assert first["prompt"] == GREEDY["prompt"]
        matches = await metric(client, "model_gateway_shadow_comparisons_total",
                               experiment="chat", shadow="s", outcome="match")  # fmt: skip
        assert matches == 2
        assert await metric(client, "model_gateway_shadow_similarity_count", shadow="s") == 2


async def test_prompts_can_be_left_out_of_the_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "shadow.jsonl"
    variants = ({"name": "a"}, {"name": "s", "shadow": {"sample_rate": 1.0}})
    settings = {"shadow": {"log_path": log, "log_prompts": False}}
    async with gateway(tiny_model_dir, *variants, **settings) as (client, _):
        await complete(client)
        await eventually(lambda: asyncio.sleep(0, len(read_log(log)) == 1), 30, "a log line")
        assert "prompt" not in read_log(log)[0]


async def test_a_failing_or_stalling_shadow_leaves_the_primary_alone(
    tiny_model_dir: Path,
) -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with StallingUpstream() as stalling:
        variants = (
            {"name": "a"},
            {"name": "dead", "upstream": {"replicas": [refused]}, "shadow": {"sample_rate": 1}},
            {"name": "slow", "upstream": {"replicas": [stalling.url]},
             "shadow": {"sample_rate": 1}},
        )  # fmt: skip
        async with gateway(tiny_model_dir, {"name": "a"}) as (client, _):
            expected = [(await complete(client)).json()["choices"][0]["text"]]
            stream = await client.post("/v1/completions", json={**GREEDY, "stream": True})
            expected.append(streamed_text(stream))
        async with gateway(tiny_model_dir, *variants, shadow={"max_concurrency": 32}) as (
            client,
            _,
        ):
            for _ in range(3):
                reply = await complete(client)
                assert reply.json()["choices"][0]["text"] == expected[0]
                stream = await client.post("/v1/completions", json={**GREEDY, "stream": True})
                assert streamed_text(stream) == expected[1]

            async def counted(outcome: str, shadow: str) -> float:
                return await metric(client, "model_gateway_shadow_comparisons_total",
                                    shadow=shadow, outcome=outcome)  # fmt: skip

            await eventually(
                lambda: _equals(counted("shadow_failed", "dead"), 6), 30, "dead shadow counted"
            )
            assert (await client.get("/ready")).status_code == 200  # shadows do not count
            # Every primary answered while its slow copy was (and is) still waiting.
            await eventually(lambda: asyncio.sleep(0, stalling.requests == 6), 10, "6 copies")
            assert await metric(client, "model_gateway_shadow_comparisons_total",
                                shadow="slow") == 0  # fmt: skip
            report = (await client.get("/admin/experiments/chat", headers=ADMIN)).json()
            a = report["report"]["variants"][0]
            assert a["name"] == "a"
            assert a["requests"] == 6
            assert a["errors"] == 0


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_shadow_copies_beyond_the_bound_are_dropped(tiny_model_dir: Path) -> None:
    async with StallingUpstream() as stalling:
        variants = (
            {"name": "a"},
            {"name": "slow", "upstream": {"replicas": [stalling.url]},
             "shadow": {"sample_rate": 1}},
            {"name": "s", "shadow": {"sample_rate": 1}},  # not starved by the slow one
        )  # fmt: skip
        async with gateway(tiny_model_dir, *variants, shadow={"max_concurrency": 2}) as (
            client,
            _,
        ):
            for _ in range(5):
                await complete(client)
            dropped = await metric(client, "model_gateway_shadow_comparisons_total",
                                   shadow="slow", outcome="dropped")  # fmt: skip
            assert dropped == 3
            await eventually(lambda: asyncio.sleep(0, stalling.requests == 2), 10, "2 copies")

            async def s_outcomes() -> dict[str, float]:
                return {outcome: await metric(client, "model_gateway_shadow_comparisons_total",
                                              shadow="s", outcome=outcome)
                        for outcome in ("match", "dropped")}  # fmt: skip

            async def all_counted() -> bool:
                return sum((await s_outcomes()).values()) == 5

            await eventually(all_counted, 30, "the other shadow's 5 outcomes")
            # Its own bound (2) holds its own copies: slow's two stalled ones take no slot.
            assert (await s_outcomes())["match"] >= 2


async def test_a_client_disconnect_does_not_cancel_the_shadow_copy(tiny_model_dir: Path) -> None:
    variants = ({"name": "a"}, {"name": "s", "shadow": {"sample_rate": 1.0}})
    async with gateway(tiny_model_dir, *variants) as (client, app):
        service = app.state.service
        request = GenerationRequest(
            model="chat", prompt="The quick brown", max_tokens=32,
            sampling=SamplingParams(temperature=0),
        )  # fmt: skip
        now = time.monotonic()
        context = RequestContext(request_id="left-early", arrived_at=now, deadline=now + 60)
        reply = service.handle(request, context)
        assert reply.variant == "a"
        events = reply.events
        await anext(events)
        await events.aclose()  # what the server does when the client goes away

        async def shadow_finished() -> bool:
            report = (await client.get("/admin/experiments/chat", headers=ADMIN)).json()
            shadow = report["report"]["shadows"][0]
            return bool(shadow["outcomes"]["primary_failed"] == 1)

        await eventually(shadow_finished, 30, "the shadow's comparison")
        report = (await client.get("/admin/experiments/chat", headers=ADMIN)).json()
        variants_report = {v["name"]: v for v in report["report"]["variants"]}
        assert variants_report["a"]["cancelled"] == 1
        assert variants_report["s"]["requests"] == 1
        assert variants_report["s"]["latency_p50_s"] is not None  # it ran to the end


async def test_admin_token_is_enforced(tiny_model_dir: Path) -> None:
    for token in (None, "", "  "):
        async with gateway(tiny_model_dir, *AB, admin_token=token) as (client, _):
            for headers in (ADMIN, {"Authorization": "Bearer "}):
                reply = await client.get("/admin/experiments", headers=headers)
                assert reply.status_code == 403
                assert "admin_token" in reply.json()["error"]["message"]
    async with gateway(tiny_model_dir, *AB) as (client, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for method, path in (("GET", "/admin/experiments"),
                                 ("PATCH", "/admin/experiments/chat")):  # fmt: skip
                reply = await client.request(method, path, headers=headers, json={})
                assert reply.status_code == 401, (headers, path)
                assert reply.headers["www-authenticate"] == "Bearer"
                assert reply.json()["error"]["code"] == "invalid_api_key"
        listed = await client.get("/admin/experiments", headers=ADMIN)
        assert listed.status_code == 200
        assert listed.json()["data"][0]["weights"] == {"a": 50, "b": 50}


async def test_live_reweighting_and_promotion(tiny_model_dir: Path) -> None:
    users = [f"user-{i}" for i in range(20)]

    async def variants_seen(client: httpx.AsyncClient) -> dict[str, int]:
        seen: dict[str, int] = {}
        for user in users:
            reply = await client.post("/v1/completions", json={**GREEDY, "user": user})
            seen[reply.headers["x-variant"]] = seen.get(reply.headers["x-variant"], 0) + 1
        return seen

    async with gateway(tiny_model_dir, *AB, {"name": "c", "weight": 0}) as (client, _):
        before = await variants_seen(client)
        assert set(before) == {"a", "b"}
        changed = await client.patch("/admin/experiments/chat", headers=ADMIN,
                                     json={"weights": {"a": 0}})  # fmt: skip
        assert changed.status_code == 200, changed.text
        assert changed.json()["weights"] == {"a": 0, "b": 50, "c": 0}
        assert changed.json()["version"] == 1
        assert await variants_seen(client) == {"b": 20}

        promotion = {"variant": "c", "previous_shadow_rate": 1.0}
        promoted = await client.post(
            "/admin/experiments/chat/promote", headers=ADMIN, json=promotion
        )
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["weights"] == {"a": 0, "b": 0, "c": 1}
        assert promoted.json()["shadows"] == {"b": 1.0}  # the old primary shadows the new one
        assert await variants_seen(client) == {"c": 20}

        async def pairs_compared() -> bool:
            report = (await client.get("/admin/experiments/chat", headers=ADMIN)).json()
            (shadow,) = report["report"]["shadows"]
            return bool(shadow["variant"] == "b" and shadow["pairs"] == 20)

        await eventually(pairs_compared, 60, "20 shadow pairs")
        report = (await client.get("/admin/experiments/chat", headers=ADMIN)).json()
        (shadow,) = report["report"]["shadows"]
        assert shadow["exact_match_ratio"] == 1.0  # the same model
        assert shadow["similarity_mean"] == 1.0
        stats = {v["name"]: v for v in report["report"]["variants"]}
        assert stats["b"]["role"] == "shadow"
        assert stats["c"]["requests"] == 20
        assert stats["c"]["error_rate"] == 0
        assert stats["c"]["latency_p50_s"] <= stats["c"]["latency_p95_s"]
        # c is the same model as a and b, so their answers (same identity) are its hits.
        assert stats["c"]["cache_hit_ratio"] == 1.0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"weights": {"a": -1}}, 400, "greater than or equal to 0"),
        ({"weights": {"zzz": 1}}, 400, "no variant 'zzz'"),
        ({"weights": {"a": 0, "b": 0}}, 400, "positive weight"),
        ({"weights": {"a": "x"}}, 400, "valid number"),
        ({"shadows": {"a": 2}}, 400, "less than or equal to 1"),
        ({"shadows": {"a": 0.5}}, 400, "cannot both answer requests"),
        ({"unknown": 1}, 400, "unknown"),
    ],
)
async def test_bad_admin_changes_are_refused(
    tiny_model_dir: Path, body: dict[str, Any], status: int, message: str
) -> None:
    async with gateway(tiny_model_dir, *AB) as (client, _):
        reply = await client.patch("/admin/experiments/chat", headers=ADMIN, json=body)
        assert reply.status_code == status, reply.text
        assert message in reply.json()["error"]["message"]
        assert (await client.get("/admin/experiments", headers=ADMIN)).json()["data"][0][
            "weights"
        ] == {"a": 50, "b": 50}
        missing = await client.get("/admin/experiments/nope", headers=ADMIN)
        assert missing.status_code == 404


async def test_replicas_share_changes_through_redis(
    tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    settings = {"redis_url": redis_server.url}
    async with (
        gateway(tiny_model_dir, *AB, **settings) as (one, _),
        gateway(tiny_model_dir, *AB, **settings) as (two, _),
    ):
        changed = await one.patch("/admin/experiments/chat", headers=ADMIN,
                                  json={"weights": {"a": 0}})  # fmt: skip
        assert changed.status_code == 200
        changed_at = time.monotonic()

        async def two_sees_it() -> bool:
            listed = (await two.get("/admin/experiments", headers=ADMIN)).json()
            return bool(listed["data"][0]["weights"]["a"] == 0)

        await eventually(two_sees_it, 1.0, "the change on the second replica")
        assert time.monotonic() - changed_at < 1.0
        assert {(await complete(two, **{"X-User-Id": f"u{i}"})).headers["x-variant"]
                for i in range(10)} == {"b"}  # fmt: skip
    # A restarted gateway starts from the stored state...
    async with gateway(tiny_model_dir, *AB, **settings) as (three, _):
        listed = (await three.get("/admin/experiments", headers=ADMIN)).json()
        assert listed["data"][0]["weights"] == {"a": 0, "b": 50}
    # ...unless it no longer fits the config (variant b was removed): the config wins.
    async with gateway(tiny_model_dir, {"name": "a"}, {"name": "c"}, **settings) as (four, _):
        listed = (await four.get("/admin/experiments", headers=ADMIN)).json()
        assert listed["data"][0]["weights"] == {"a": 1, "c": 1}
