"""RedisLimiter against a real redis-server, as two gateway replicas sharing it: limits hold
across both under concurrency, and a dead or frozen Redis costs a request at most about
its timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from app.domain import NotReadyError, Quota, RateLimitedError, Tenant
from app.settings import RateLimitSettings
from app.tenancy.limits import KEY_PREFIX, RedisLimiter
from tests.live_server import eventually
from tests.redis_server import RedisServer

Replicas = Callable[..., tuple[RedisLimiter, RedisLimiter]]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    """Two limiters (two replicas) on the test's Redis, with the given rate_limits settings.
    The timeout is 1 s unless given: a cold burst opens dozens of connections, and tests that
    are not about faults must not fail open."""
    made: list[RedisLimiter] = []

    def make(**settings: Any) -> tuple[RedisLimiter, RedisLimiter]:
        config = RateLimitSettings(**{"timeout_ms": 1000, **settings})
        pair = tuple(RedisLimiter(redis_server.url, config) for _ in "ab")
        made.extend(pair)
        return pair[0], pair[1]

    yield make
    for limiter in made:
        await limiter.close()


async def outcomes(
    replicas: tuple[RedisLimiter, RedisLimiter], tenant: Tenant, n: int, tokens: int = 0
) -> tuple[list[Quota | None], list[RateLimitedError]]:
    """n admissions at once, alternating between the replicas."""
    replies = await asyncio.gather(
        *(replicas[i % 2].admit(tenant, f"r{i}", tokens, 30) for i in range(n)),
        return_exceptions=True,
    )
    refused = [r for r in replies if isinstance(r, RateLimitedError)]
    admitted = [r for r in replies if r is None or isinstance(r, Quota)]
    assert len(admitted) + len(refused) == n, replies
    return admitted, refused


async def test_exactly_n_admitted_across_replicas(replicas: Replicas) -> None:
    a, b = replicas()
    key = Tenant("k", requests_per_minute=20, tokens_per_minute=10_000)  # one request every 3 s
    admitted, refused = await outcomes((a, b), key, 60, tokens=10)
    assert len(admitted) == 20
    # Atomic: each admission saw its own place in the bucket.
    assert sorted(q.remaining_requests for q in admitted if q) == list(range(20))
    # (The token bucket refills 167 a second: a slow machine sees a few come back.)
    tokens = sorted(q.remaining_tokens for q in admitted if q and q.remaining_tokens is not None)
    expected = range(9800, 10_000, 10)
    assert all(0 <= got - want <= 5 for got, want in zip(tokens, expected, strict=True))
    assert all(q.reset_requests_s is not None and q.reset_requests_s <= 60.1 for q in admitted if q)
    assert {e.reason for e in refused} == {"requests"}
    assert {e.retry_after_s for e in refused} <= {3}
    assert all(e.quota is not None and e.quota.remaining_requests == 0 for e in refused)
    usage = await b.usage("k", 60)
    assert usage["rejected"]["requests"] == 40


async def test_concurrency_across_replicas(replicas: Replicas, redis_server: RedisServer) -> None:
    a, b = replicas()
    key = Tenant("k", max_concurrent=3)
    admitted, refused = await outcomes((a, b), key, 10)
    assert (len(admitted), {e.reason for e in refused}) == (3, {"concurrency"})
    slots = redis_server.client().zrange(f"{KEY_PREFIX}{{k}}:concurrency", 0, -1)
    held = sorted(s.decode() for s in slots)
    await b.release(key, held[0], 0, 0, 0)  # released by the other replica
    await a.admit(key, "next", 0, 30)
    with pytest.raises(RateLimitedError):
        await b.admit(key, "more", 0, 30)
    # A slot whose process died frees itself after hold_s.
    await b.release(key, held[1], 0, 0, 0)
    await a.admit(key, "short", 0, hold_s=0.2)

    async def expired() -> bool:
        try:
            await b.admit(key, "after", 0, 30)
        except RateLimitedError:
            return False
        return True

    await eventually(expired, 5, "the short slot to expire")


async def test_tokens_reconciled_across_replicas(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = replicas()
    key = Tenant("k", tokens_per_minute=6000, daily_tokens=5000)  # 100 tokens a second
    quota = await a.admit(key, "r", 1000, 30)
    assert quota is not None
    assert quota.remaining_tokens == 5000
    assert quota.reset_tokens_s == pytest.approx(10, abs=0.1)
    # Used 2000 more than charged, on the other replica.
    await b.release(key, "r", charged_tokens=1000, prompt_tokens=1000, completion_tokens=2000)
    quota = await a.admit(key, "s", 2000, 30)
    assert quota is not None
    assert 1000 <= quota.remaining_tokens <= 1020  # refilled a little meanwhile
    # Used 1000 less than charged: they come back.
    await b.release(key, "s", charged_tokens=2000, prompt_tokens=1000, completion_tokens=0)
    quota = await b.admit(key, "t", 0, 30)
    assert quota is not None
    assert 2000 <= quota.remaining_tokens <= 2020
    # The daily budget saw the same: 3000 + 1000 of 5000 used.
    daily = f"{KEY_PREFIX}{{k}}:daily:{int(time.time() // 86_400)}"
    assert redis_server.client().get(daily) == b"4000"
    error = (await outcomes((a, b), key, 1, tokens=6001))[1][0]
    assert (error.reason, error.retry_after_s) == ("tokens", 60)
    assert "larger than the limit" in error.message
    error = (await outcomes((a, b), key, 1, tokens=1001))[1][0]
    assert error.reason == "daily_tokens"
    assert error.quota is not None
    assert error.quota.remaining_tokens is not None
    assert error.quota.remaining_tokens >= 2000  # refused: nothing charged


async def test_usage_across_replicas_and_every_key_expires(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = replicas()
    key, free = Tenant("k", requests_per_minute=2), Tenant("free")
    for i, limiter in enumerate((a, b, a)):
        try:
            await limiter.admit(key, f"r{i}", 5, 30)
        except RateLimitedError:
            pass
        else:
            await limiter.release(key, f"r{i}", 5, prompt_tokens=5, completion_tokens=i + 1)
    await b.release(free, "f", 0, prompt_tokens=4, completion_tokens=4)
    usage = await a.usage("k", 3600)
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 10, 3)
    assert usage["rejected"] == {"requests": 1, "tokens": 0, "concurrency": 0, "daily_tokens": 0}
    assert (await b.usage("free", 60))["prompt_tokens"] == 4
    store = redis_server.client()
    keys = store.keys("*")
    assert keys
    assert all(k.startswith(KEY_PREFIX.encode()) for k in keys)
    assert all(store.pttl(k) > 0 for k in keys), [(k, store.pttl(k)) for k in keys]


async def test_killed_redis_open_admits_closed_refuses(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    key = Tenant("k", requests_per_minute=100)
    faults: list[None] = []
    open_ = RedisLimiter(
        redis_server.url,
        RateLimitSettings(breaker_reset_s=0.2),
        on_fault=lambda: faults.append(None),
    )
    closed = replicas(on_redis_error="closed", timeout_ms=50)[0]
    try:
        assert await open_.admit(key, "warm", 0, 30) is not None
        redis_server.kill()
        for i in range(5):
            started = time.monotonic()
            # Open: this process's own limits, a fresh bucket.
            quota = await open_.admit(key, f"r{i}", 0, 30)
            assert quota is not None
            assert quota.remaining_requests == 99 - i
            assert time.monotonic() - started < 0.2
            with pytest.raises(NotReadyError, match="cannot check rate limits"):
                await closed.admit(key, "r", 0, 30)
        assert open_.faults == len(faults) == 5
        await open_.release(key, "r0", 0, 0, 0)  # to the fallback that admitted it
        await open_.release(key, "warm", 0, 0, 0)  # never raises
        assert open_.faults == 5  # checks not made, not releases
        # Still a bound: the fallback refuses past the limit.
        tight = Tenant("tight", requests_per_minute=2)
        for i in range(2):
            await open_.admit(tight, f"t{i}", 0, 30)
        with pytest.raises(RateLimitedError):
            await open_.admit(tight, "t2", 0, 30)
        assert await open_.admit(Tenant("free"), "r", 0, 30) is None  # no limits: no call
        assert open_.faults == 8
        with pytest.raises(NotReadyError, match="cannot read usage"):
            await open_.usage("k", 60)

        redis_server.start()  # empty: the script is loaded again

        async def checked() -> bool:
            before = open_.faults
            await open_.admit(key, "r", 0, 30)
            return open_.faults == before

        await eventually(checked, 5, "the breaker to close on the restarted Redis")
    finally:
        await open_.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_frozen_redis_costs_at_most_the_timeout(
    replicas: Replicas, redis_server: RedisServer, mode: str
) -> None:
    a, b = replicas(on_redis_error=mode, timeout_ms=50, breaker_reset_s=30)
    key = Tenant("k", requests_per_minute=1000, max_concurrent=100)
    await a.admit(key, "warm", 0, 30)
    redis_server.freeze()
    try:
        for _ in range(3):  # before and after the breaker opens
            started = time.monotonic()
            replies = await asyncio.gather(
                *(limiter.admit(key, "r", 0, 30) for limiter in (a, b) * 10),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 0.5
            if mode == "open":  # each process's own limits meanwhile
                assert all(isinstance(r, Quota) for r in replies), replies
            else:
                assert all(isinstance(r, NotReadyError) for r in replies), replies
        assert a.faults == b.faults == 30
    finally:
        redis_server.thaw()
