"""API keys, limits and priorities through the HTTP APIs: two live gateway processes sharing
a real Redis (limits and key changes across replicas, Redis killed), and in-process apps on
the tiny model (token accounting, fair queuing in the batcher)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.tenancy.keys import hash_secret
from tests.conftest import AppFactory
from tests.live_server import ServerProcess, eventually, metric_value, wait_until
from tests.redis_server import RedisServer

ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RPM = 7


def key(name: str, **fields: Any) -> tuple[dict[str, Any], str]:
    """A key's config entry and its secret."""
    secret = f"mg-test-{name}"
    return {"name": name, "sha256": hash_secret(secret), **fields}, secret


LIMITED, LIMITED_SECRET = key("limited", limits={"requests_per_minute": RPM})
FREE, FREE_SECRET = key("free")
ONLY_OTHER, ONLY_OTHER_SECRET = key("only-other", models=["other"])


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def completion(max_tokens: int = 2, model: str = "tiny") -> dict[str, Any]:
    return {"model": model, "prompt": "Once upon", "max_tokens": max_tokens}


@pytest.fixture(scope="module")
def redis_for_module() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateways(tiny_model_dir: Path, redis_for_module: RedisServer) -> Iterator[list[str]]:
    """Two gateway processes sharing one Redis, keys required."""
    variants = [{"name": "tiny", "model_path": str(tiny_model_dir)},
                {"name": "other", "model_path": str(tiny_model_dir)}]  # fmt: skip
    servers = [
        ServerProcess(
            variants,
            auth="required",
            keys=json.dumps([LIMITED, FREE, ONLY_OTHER]),
            redis_url=redis_for_module.url,
            admin_token=ADMIN_TOKEN,
            experiment_sync_interval_s="0.2",
            # Exactness, not the fail-open path (tested below): this busy machine can stall
            # an event loop for longer than the default 50 ms.
            rate_limits=json.dumps({"timeout_ms": 1000}),
        )
        for _ in range(2)
    ]
    try:
        for server in servers:
            server.start()
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.stop()


def test_keys_are_required_and_checked(gateways: list[str]) -> None:
    url = gateways[0]
    for headers in ({}, bearer("mg-wrong"), {"api-key": "mg-wrong"}):
        reply = httpx.post(url + "/v1/completions", json=completion(), headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert "mg-wrong" not in reply.text
    # TGI's API answers in TGI's error format.
    reply = httpx.post(url + "/generate", json={"inputs": "Hi"})
    assert reply.status_code == 401
    assert reply.json()["error_type"] == "authentication"
    # Every header a client may use.
    for headers in (bearer(FREE_SECRET), {"api-key": FREE_SECRET}, {"x-api-key": FREE_SECRET}):
        reply = httpx.post(url + "/v1/completions", json=completion(), headers=headers)
        assert reply.status_code == 200, reply.text
    # Open: health, readiness, metrics.
    for path in ("/health", "/ready", "/ping", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    assert metric_value(url, "model_gateway_key_rejections_total", reason="unauthenticated") >= 4


def test_a_key_uses_only_its_models(gateways: list[str]) -> None:
    url = gateways[0]
    headers = bearer(ONLY_OTHER_SECRET)
    reply = httpx.post(url + "/v1/completions", json=completion(), headers=headers)
    assert reply.status_code == 403
    assert reply.json()["error"]["param"] == "model"
    ok = httpx.post(url + "/v1/completions", json=completion(model="other"), headers=headers)
    assert ok.status_code == 200
    models = httpx.get(url + "/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in models] == ["other"]


def test_a_request_limit_holds_across_gateway_processes(gateways: list[str]) -> None:
    def post(i: int) -> httpx.Response:
        url = gateways[i % 2]
        return httpx.post(url + "/v1/completions", json=completion(1),
                          headers=bearer(LIMITED_SECRET), timeout=30)  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, range(RPM + 5)))
    statuses = sorted(r.status_code for r in replies)
    # A minute's worth refills one request every 60/RPM s: far longer than these take.
    assert statuses == [200] * RPM + [429] * 5
    ok = [r for r in replies if r.status_code == 200]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(RPM))
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60 / RPM + 1
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    rejected = sum(
        metric_value(url, "model_gateway_key_rejections_total", key="limited", reason="requests")
        for url in gateways
    )
    assert rejected == 5


def test_a_revoked_key_is_refused_by_every_process_within_a_second(gateways: list[str]) -> None:
    first, second = gateways
    created = httpx.post(first + "/admin/keys", json={"name": "temp"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert "sha256" not in created.json()
    wait_until(
        lambda: httpx.post(second + "/v1/completions", json=completion(),
                           headers=bearer(secret)).status_code == 200,
        timeout_s=1, what="the new key to reach the other process",
    )  # fmt: skip
    assert httpx.delete(first + "/admin/keys/temp", headers=ADMIN).json()["revoked"] is True
    start = time.monotonic()
    wait_until(
        lambda: httpx.post(second + "/v1/completions", json=completion(),
                           headers=bearer(secret)).status_code == 401,
        timeout_s=1, what="the revocation to reach the other process",
    )  # fmt: skip
    assert time.monotonic() - start < 1
    listed = httpx.get(second + "/admin/keys", headers=ADMIN).json()["data"]
    assert {"name": "temp", "revoked": True}.items() <= next(
        k for k in listed if k["name"] == "temp"
    ).items()


def test_usage_per_key_across_processes(gateways: list[str]) -> None:
    created = httpx.post(gateways[0] + "/admin/keys", json={"name": "counted"}, headers=ADMIN)
    secret = created.json()["secret"]  # in this reply only
    first = {**completion(2), "ignore_eos": True}
    wait_until(
        lambda: httpx.post(gateways[1] + "/v1/completions", json=first,
                           headers=bearer(secret)).status_code == 200,
        timeout_s=2, what="the key to work on the other process",
    )  # fmt: skip
    body = {**completion(3), "ignore_eos": True}
    reply = httpx.post(gateways[0] + "/v1/completions", json=body, headers=bearer(secret))
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]

    def counted() -> bool:
        got = httpx.get(gateways[0] + "/admin/keys/counted/usage", headers=ADMIN).json()
        return (got["requests"], got["prompt_tokens"], got["completion_tokens"]) == (
            2,
            2 * prompt_tokens,
            2 + 3,
        )

    wait_until(counted, timeout_s=2, what="both requests in the key's usage")


def test_redis_down_fails_open_by_default(tiny_model_dir: Path) -> None:
    redis = RedisServer()
    redis.start()
    variants = [{"name": "tiny", "model_path": str(tiny_model_dir)}]
    limited, secret = key("limited", limits={"requests_per_minute": 1000})
    servers = {
        mode: ServerProcess(variants, auth="required", keys=json.dumps([limited]),
                            redis_url=redis.url, rate_limits=json.dumps({"on_redis_error": mode}))
        for mode in ("open", "closed")
    }  # fmt: skip
    try:
        for server in servers.values():
            server.start()
        redis.kill()
        for mode, server in servers.items():
            statuses = set()
            for _ in range(5):
                start = time.monotonic()
                reply = httpx.post(server.url + "/v1/completions", json=completion(),
                                   headers=bearer(secret), timeout=30)  # fmt: skip
                statuses.add(reply.status_code)
                assert time.monotonic() - start < 5
            assert statuses == ({200} if mode == "open" else {503}), (mode, statuses)
            assert metric_value(server.url, "model_gateway_rate_limit_errors_total") >= 1
    finally:
        for server in servers.values():
            server.stop()
        redis.kill()


# -- in process: token accounting and priorities -----------------------------------------


async def test_token_limits_charge_real_token_counts(make_client: AppFactory) -> None:
    limit = 1000
    tokens, secret = key("tokens", limits={"tokens_per_minute": limit})
    body = {**completion(40), "ignore_eos": True}
    async with make_client(auth="required", keys=[tokens], admin_token=ADMIN_TOKEN) as client:
        start = time.monotonic()
        first = await client.post("/v1/completions", json=body, headers=bearer(secret))
        usage = first.json()["usage"]
        # Charged on admission: the prompt; the completion is reconciled at the end.
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == limit - usage["prompt_tokens"]

        async def reconciled() -> bool:  # off the request's path, once it has ended
            got = await client.get("/admin/keys/tokens/usage", headers=ADMIN)
            return bool(got.json()["completion_tokens"] == usage["completion_tokens"])

        await eventually(reconciled, 2, "the completion's tokens to be counted")
        second = await client.post("/v1/completions", json=body, headers=bearer(secret))
        refill = (time.monotonic() - start) * limit / 60  # the bucket refills meanwhile
    spent = usage["total_tokens"] + second.json()["usage"]["prompt_tokens"]
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert limit - spent <= remaining <= limit - spent + refill + 1
    assert refill < usage["completion_tokens"], "too slow to tell"


async def test_a_prompt_over_the_token_limit_is_refused(make_client: AppFactory) -> None:
    tokens, secret = key("tokens", limits={"tokens_per_minute": 3})
    async with make_client(auth="required", keys=[tokens]) as client:
        body = {"model": "tiny", "prompt": "one two three four five six", "max_tokens": 1}
        reply = await client.post("/v1/completions", json=body, headers=bearer(secret))
        assert reply.status_code == 429
        assert "tokens" in reply.json()["error"]["message"]


async def test_concurrency_limit(make_client: AppFactory) -> None:
    one, secret = key("one", limits={"max_concurrent": 1})
    async with make_client(auth="required", keys=[one]) as client:
        body = {**completion(64), "ignore_eos": True}
        replies = await asyncio.gather(
            *(client.post("/v1/completions", json=body, headers=bearer(secret)) for _ in range(3))
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses[0] == 200
        assert 429 in statuses
        refused = next(r for r in replies if r.status_code == 429)
        assert "concurrent" in refused.json()["error"]["message"]


PRIORITY_KEYS = [
    key("chat", priority="interactive"),
    key("bulk", priority="batch"),
    key("bulk-small", priority="batch"),
    key("standard"),
]
SECRETS = {entry["name"]: secret for entry, secret in PRIORITY_KEYS}


class Finishes:
    """Requests sent one after another without waiting, and the order their replies come
    back in. Each request runs long enough on the tiny model (batches of one) that those
    sent later queue up."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self.order: list[str] = []
        self.done_when_sent: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def send(
        self, label: str, secret: str, priority_header: str | None = None, **fields: Any
    ) -> None:
        body = {**completion(200), "ignore_eos": True, **fields}
        headers = bearer(secret)
        if priority_header is not None:
            headers["X-Priority"] = priority_header
        self.done_when_sent[label] = len(self.order)
        self._tasks.append(asyncio.create_task(self._one(label, body, headers)))
        await asyncio.sleep(0)  # on its way before the next is sent

    async def _one(self, label: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        reply = await self._client.post("/v1/completions", json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        self.order.append(label)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)

    def passed(self, label: str) -> int:
        """How many of those queued when `label` was sent finished before it."""
        return self.order.index(label) - self.done_when_sent[label]

    def behind(self, label: str) -> int:
        return len(self.order) - self.order.index(label) - 1


SERIAL = {"inter_threads": 1, "batching": {"max_batch_size": 1, "max_queue_size": 512}}


async def test_an_interactive_request_passes_a_batch_backlog(make_client: AppFactory) -> None:
    async with make_client(SERIAL, auth="required",
                           keys=[entry for entry, _ in PRIORITY_KEYS]) as client:  # fmt: skip
        finishes = Finishes(client)
        for i in range(100):
            await finishes.send(f"bulk{i}", SECRETS["bulk"])
        await finishes.send("chat", SECRETS["chat"])
        await finishes.wait()
    assert finishes.behind("chat") >= 10, "the backlog drained before it came: too fast to tell"
    # Behind the batch that was running when it came, and at most one more that was forming.
    assert finishes.passed("chat") <= 2, finishes.order


async def test_two_keys_of_one_class_alternate(make_client: AppFactory) -> None:
    async with make_client(SERIAL, auth="required",
                           keys=[entry for entry, _ in PRIORITY_KEYS]) as client:  # fmt: skip
        finishes = Finishes(client)
        for i in range(50):
            await finishes.send(f"bulk{i}", SECRETS["bulk"])
        for i in range(2):
            await finishes.send(f"small{i}", SECRETS["bulk-small"])
        await finishes.wait()
    assert finishes.behind("small1") >= 10, "the backlog drained before they came"
    # The keys take turns: one bulk request between the two small ones, give or take the
    # batch running when they came.
    assert finishes.passed("small0") <= 2, finishes.order
    assert finishes.passed("small1") <= 4, finishes.order


async def test_a_request_may_lower_its_priority_not_raise_it(make_client: AppFactory) -> None:
    async with make_client(SERIAL, auth="required",
                           keys=[entry for entry, _ in PRIORITY_KEYS]) as client:  # fmt: skip
        finishes = Finishes(client)
        for i in range(30):
            await finishes.send(f"standard{i}", SECRETS["standard"])
        await finishes.send("lowered", SECRETS["chat"], priority_header="batch")
        await finishes.send("flex", SECRETS["chat"], service_tier="flex")  # OpenAI's "batch"
        await finishes.send("raised", SECRETS["standard"], priority_header="interactive")
        await finishes.wait()
        # "raised" stayed standard: behind the standard requests queued before it...
        assert finishes.passed("raised") >= 10, finishes.order
        # ...and the two lowered to batch come after every standard request.
        assert finishes.order[-2:] in (["lowered", "flex"], ["flex", "lowered"]), finishes.order
        headers = {**bearer(SECRETS["standard"]), "X-Priority": "urgent"}
        bad = await client.post("/v1/completions", json=completion(), headers=headers)
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "X-Priority"


async def test_without_keys_a_request_picks_its_class(make_client: AppFactory) -> None:
    """Auth off (a worker behind a gateway, told each request's class): X-Priority may
    raise a request above the standard class."""
    async with make_client(SERIAL) as client:
        finishes = Finishes(client)
        for i in range(30):
            await finishes.send(f"standard{i}", "")
        await finishes.send("interactive", "", priority_header="interactive")
        await finishes.wait()
    assert finishes.behind("interactive") >= 10, "the backlog drained before it came"
    assert finishes.passed("interactive") <= 2, finishes.order


async def test_auth_optional_serves_anonymous_calls_but_not_unknown_keys(
    make_client: AppFactory,
) -> None:
    async with make_client(auth="optional", keys=[FREE]) as client:
        assert (await client.post("/v1/completions", json=completion())).status_code == 200
        reply = await client.post("/v1/completions", json=completion(), headers=bearer("nope"))
        assert reply.status_code == 401
        ok = await client.post("/v1/completions", json=completion(), headers=bearer(FREE_SECRET))
        assert ok.status_code == 200


async def test_the_key_name_is_the_sticky_user(
    make_client: AppFactory, tiny_model_dir: Path
) -> None:
    """The key's name, never its secret, is the user of the A/B split (and of metrics)."""
    keys = [key(f"user{i}") for i in range(6)]
    experiment = {
        "name": "exp",
        "variants": [
            {"name": "a", "model_path": tiny_model_dir},
            {"name": "b", "model_path": tiny_model_dir},
        ],
    }
    async with make_client(auth="optional", keys=[entry for entry, _ in keys],
                           experiments=[experiment]) as client:  # fmt: skip
        for entry, secret in keys:
            body = {**completion(1, model="exp")}
            with_key = await client.post("/v1/completions", json=body, headers=bearer(secret))
            named = await client.post("/v1/completions", json={**body, "user": entry["name"]})
            assert with_key.headers["x-variant"] == named.headers["x-variant"]
        metrics = (await client.get("/metrics")).text
        assert 'model_gateway_key_requests_total{key="user0",model="exp"} 1.0' in metrics
        assert all(secret not in metrics for _, secret in keys)
