"""MemoryLimiter on a clock the test moves: the continuously refilled buckets, reconciliation,
concurrency slots, the daily budget, refusals that charge nothing, and usage."""

from __future__ import annotations

import pytest

from app.domain import Quota, RateLimitedError, Tenant
from app.tenancy.limits import MemoryLimiter

MIDNIGHT = 1_700_006_400.0  # a UTC midnight: epoch-sized times round as they do for real


class Clock:
    def __init__(self) -> None:
        self.now = MIDNIGHT + 3600

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> MemoryLimiter:
    return MemoryLimiter(clock)


async def admit(limiter: MemoryLimiter, tenant: Tenant, tokens: int = 0, rid: str = "r") -> Quota:
    quota = await limiter.admit(tenant, rid, tokens, hold_s=30)
    assert quota is not None
    return quota


async def refused(limiter: MemoryLimiter, tenant: Tenant, tokens: int = 0) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as caught:
        await limiter.admit(tenant, "refused", tokens, hold_s=30)
    return caught.value


async def test_exactly_n_requests_a_minute_then_a_refill_every_interval(
    limiter: MemoryLimiter, clock: Clock
) -> None:
    key = Tenant("k", requests_per_minute=10)  # one request every 6 s
    quotas = [await admit(limiter, key) for _ in range(10)]
    assert [q.remaining_requests for q in quotas] == list(range(9, -1, -1))
    assert quotas[-1].reset_requests_s == pytest.approx(60)
    assert quotas[0].headers()["x-ratelimit-limit-requests"] == "10"
    for _ in range(3):
        error = await refused(limiter, key)
        assert (error.reason, error.retry_after_s) == ("requests", 6)
        assert error.quota is not None
        assert error.quota.remaining_requests == 0
    clock.now += 5.9
    assert (await refused(limiter, key)).retry_after_s == 1
    clock.now += 0.1
    assert (await admit(limiter, key)).remaining_requests == 0
    await refused(limiter, key)
    clock.now += 60
    assert (await admit(limiter, key)).remaining_requests == 9


async def test_tokens_charged_on_admission_and_reconciled_on_release(
    limiter: MemoryLimiter,
) -> None:
    key = Tenant("k", tokens_per_minute=1000)
    assert (await admit(limiter, key, tokens=100)).remaining_tokens == 900
    await limiter.release(key, "r", charged_tokens=100, prompt_tokens=100, completion_tokens=300)
    assert (await admit(limiter, key)).remaining_tokens == 600
    # Charged 400 for a prompt that came to 100 tokens and 0 more: 300 come back.
    assert (await admit(limiter, key, tokens=400)).remaining_tokens == 200
    await limiter.release(key, "r", charged_tokens=400, prompt_tokens=100, completion_tokens=0)
    assert (await admit(limiter, key)).remaining_tokens == 500
    # An answer far larger than charged leaves a debt (90 s ahead) that requests wait out.
    await limiter.release(key, "r", charged_tokens=0, prompt_tokens=0, completion_tokens=1000)
    error = await refused(limiter, key)
    assert (error.reason, error.retry_after_s) == ("tokens", 30)
    assert error.quota == Quota(None, None, None, 1000, 0, pytest.approx(90))


async def test_a_prompt_over_the_whole_minute_can_never_pass(limiter: MemoryLimiter) -> None:
    key = Tenant("k", tokens_per_minute=100)
    error = await refused(limiter, key, tokens=101)
    assert error.reason == "tokens"
    assert "larger than the limit" in error.message
    assert "never" in error.message
    assert (await admit(limiter, key, tokens=100)).remaining_tokens == 0  # nothing was charged


async def test_concurrency_slots_freed_on_release_or_after_hold(
    limiter: MemoryLimiter, clock: Clock
) -> None:
    key = Tenant("k", max_concurrent=2)
    assert await limiter.admit(key, "a", 0, hold_s=30) is None  # no per-minute limit
    await limiter.admit(key, "b", 0, hold_s=10)
    error = await refused(limiter, key)
    assert (error.reason, error.retry_after_s, error.quota) == ("concurrency", 1, None)
    await limiter.release(key, "a", 0, 0, 0)
    await limiter.admit(key, "c", 0, hold_s=30)
    await refused(limiter, key)
    clock.now += 10  # b's process died: its slot expires
    await limiter.admit(key, "d", 0, hold_s=30)
    await refused(limiter, key)


async def test_daily_budget_until_utc_midnight(limiter: MemoryLimiter, clock: Clock) -> None:
    key = Tenant("k", daily_tokens=1000)
    await limiter.admit(key, "a", 600, hold_s=30)
    clock.now = MIDNIGHT + 86_400 - 100
    error = await refused(limiter, key, tokens=500)
    assert (error.reason, error.retry_after_s) == ("daily_tokens", 100)
    await limiter.admit(key, "b", 400, hold_s=30)
    await limiter.release(key, "b", charged_tokens=400, prompt_tokens=400, completion_tokens=1)
    await refused(limiter, key)  # the release pushed the day over its budget
    clock.now = MIDNIGHT + 86_400
    await limiter.admit(key, "c", 1000, hold_s=30)


async def test_a_refused_request_charges_nothing(limiter: MemoryLimiter) -> None:
    key = Tenant("k", requests_per_minute=2, tokens_per_minute=100, max_concurrent=1)
    first = await admit(limiter, key, tokens=50, rid="a")
    error = await refused(limiter, key, tokens=50)
    assert error.reason == "concurrency"
    assert error.quota == first  # the refusal's quota is where the key stands
    await limiter.release(key, "a", charged_tokens=50, prompt_tokens=50, completion_tokens=0)
    last = await admit(limiter, key, tokens=50, rid="b")
    assert (last.remaining_requests, last.remaining_tokens) == (0, 0)


async def test_usage_sums_minutes_and_counts_refusals(limiter: MemoryLimiter, clock: Clock) -> None:
    key, free = Tenant("k", requests_per_minute=1), Tenant("free")
    await limiter.admit(key, "a", 10, hold_s=30)
    await limiter.release(key, "a", 10, prompt_tokens=10, completion_tokens=5)
    await refused(limiter, key)
    clock.now += 120
    assert await limiter.admit(free, "b", 7, hold_s=30) is None  # no limits: nothing to check
    await limiter.release(free, "b", 7, prompt_tokens=7, completion_tokens=3)
    await limiter.admit(key, "c", 20, hold_s=30)
    await limiter.release(key, "c", 20, prompt_tokens=20, completion_tokens=1)

    rejected = {"requests": 1, "tokens": 0, "concurrency": 0, "daily_tokens": 0}
    day = await limiter.usage("k", 86_400)
    assert day == {
        "requests": 2,
        "prompt_tokens": 30,
        "completion_tokens": 6,
        "rejected": rejected,
        "window_s": 86_400,
    }
    recent = await limiter.usage("k", 60)
    assert (recent["requests"], recent["prompt_tokens"], recent["rejected"]["requests"]) == (
        1,
        20,
        0,
    )
    assert (await limiter.usage("free", 60))["completion_tokens"] == 3
    assert (await limiter.usage("nobody", 60))["requests"] == 0
    clock.now += 86_400 + 120
    assert (await limiter.usage("k", 86_400))["requests"] == 0
