"""Routing policies on real processes: a live gateway in front of three stub upstreams.
Requests sharing a prefix go to one replica while it is not overloaded and spread when it
is; a replica that dies loses its prefixes and its traffic; `session` keeps a user on one
replica and moves only that replica's users when it leaves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx

from tests.live_server import live_server, metric_value
from tests.stub_upstream import StubUpstream

SYSTEM = "You are the support assistant of ACME Corporation. Answer briefly. " * 30


@contextmanager
def gateway(
    policy: str, upstreams: list[StubUpstream], max_concurrency_per_replica: int = 256
) -> Iterator[str]:  # fmt: skip
    upstream = {"replicas": [u.url for u in upstreams], "health_check_interval_s": 0.2,
                "max_concurrency_per_replica": max_concurrency_per_replica,
                "routing": {"policy": policy}}  # fmt: skip
    variants = [{"name": "up", "backend": "openai", "upstream": upstream}]
    with live_server(variants, cache=json.dumps({"enabled": False})) as url:
        yield url


def post(url: str, prompt: str, user: str | None = None) -> None:
    body = {"model": "up", "prompt": prompt, "max_tokens": 2, **({"user": user} if user else {})}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text


def holders(upstreams: list[StubUpstream], marker: str) -> list[int]:
    """How many prompts containing `marker` each upstream got."""
    return [sum(marker in p for p in u.prompts) for u in upstreams]


def test_a_shared_prefix_goes_where_its_cache_is_until_that_replica_is_overloaded() -> None:
    with ExitStack() as stack:
        upstreams = [stack.enter_context(StubUpstream(reply_delay_s=0.3)) for _ in range(3)]
        url = stack.enter_context(gateway("prefix", upstreams))
        for i in range(6):
            post(url, SYSTEM + f"Question {i}?")
        assert sorted(holders(upstreams, "Question")) == [0, 0, 6]
        assert metric_value(url, "model_gateway_route_decisions_total", reason="prefix_hit") == 5
        # Another tenant's prefix is cold: it goes to the least loaded, then stays.
        for i in range(3):
            post(url, "Translate to French. " * 60 + f"Text {i}")
        assert sorted(holders(upstreams, "Text")) == [0, 0, 3]
        # Thirty at once: the holder fills up and the others take the overflow.
        with ThreadPoolExecutor(30) as pool:
            list(pool.map(lambda i: post(url, SYSTEM + f"Burst {i}?"), range(30)))
        burst = holders(upstreams, "Burst")
        assert max(burst) < 30
        assert sum(n > 0 for n in burst) >= 2, burst
        assert metric_value(url, "model_gateway_route_decisions_total", reason="load_override")


def test_requests_that_waited_for_a_slot_are_routed_by_the_policy_too() -> None:
    with ExitStack() as stack:
        upstreams = [stack.enter_context(StubUpstream(reply_delay_s=0.2)) for _ in range(2)]
        url = stack.enter_context(gateway("prefix", upstreams, max_concurrency_per_replica=1))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: post(url, SYSTEM + f"Queued {i}?"), range(8)))
        # Six of them waited at the gateway; each freed slot was placed by the policy.
        assert metric_value(url, "model_gateway_route_decisions_total", policy="prefix") == 8


def test_a_dead_replica_loses_its_prefixes_and_its_traffic() -> None:
    with ExitStack() as stack:
        upstreams = [stack.enter_context(StubUpstream()) for _ in range(3)]
        url = stack.enter_context(gateway("prefix", upstreams))
        post(url, SYSTEM + "Before")
        (holder,) = [u for u in upstreams if u.prompts]
        holder.stop()
        for i in range(6):
            post(url, SYSTEM + f"After {i}")  # retried elsewhere at first; none fails
        assert holders([holder], "After") == [0]
        # The prefix settles on one of the others.
        survivors = [u for u in upstreams if u is not holder]
        assert max(holders(survivors, "After")) >= 5


def test_sessions_stick_and_only_the_leavers_users_move() -> None:
    with ExitStack() as stack:
        upstreams = [stack.enter_context(StubUpstream()) for _ in range(3)]
        url = stack.enter_context(gateway("session", upstreams))
        users = [f"user{i}" for i in range(24)]
        home = {}
        for user in users:
            post(url, f"hello from {user};", user)
            post(url, f"again from {user};", user)
            (home[user],) = [i for i, u in enumerate(upstreams)
                             if any(f"from {user};" in p for p in u.prompts)]  # fmt: skip
        assert len(set(home.values())) == 3  # spread over all three
        upstreams[0].stop()
        for user in users:
            post(url, f"later from {user};", user)
        for user in users:
            now = [i for i, u in enumerate(upstreams) if any(f"later from {user};" in p
                                                            for p in u.prompts)]  # fmt: skip
            if home[user] != 0:
                assert now == [home[user]], user
            else:
                assert now != [0], user
