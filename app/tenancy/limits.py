"""Per-key rate limits, shared by the gateway replicas through Redis (per process without it).

Requests and tokens per minute are continuously refilled buckets (GCRA; OpenAI's limits
"replenish continuously"). Per key and limit one number is kept, the theoretical arrival
time (TAT). With T = 60 s / limit, a cost c at `now` moves it to max(TAT, now) + c*T and
passes if that is at most 60 s ahead of now. How far it is ahead is how long until the
bucket is whole again; (60 - ahead) / T is what is left. Admission charges the prompt;
release charges (or gives back) the difference to what the request used, which may leave the
TAT more than 60 s ahead: a debt later requests wait out. Concurrency is a set of request ids
with expiry times (the slots of a replica that died expire after hold_s); the daily budget is
a counter per UTC day. Every limit is checked before any is charged: a refusal charges
nothing. Usage is counted per key and minute (kept 25 h).

With Redis, admit and release are one Lua script each: one round trip, atomic, on the
server's clock (TIME), with all of a key's state under one hash tag. Only the day and minute
buckets are named by the replica's clock (skew moves a count to the neighbouring bucket).
Redis must not slow requests down: each call has a deadline of rate_limits.timeout_ms and a
circuit breaker leaves a failing Redis alone; meanwhile requests pass unchecked or get 503
(rate_limits.on_redis_error: "open" falls back to this process's own limits, a bound rather
than none), and each check Redis did not make is counted (`faults`, `on_fault`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.breaker import CircuitBreaker
from app.domain import NotReadyError, Quota, RateLimitedError, Tenant
from app.settings import RateLimitSettings

logger = logging.getLogger(__name__)

KEY_PREFIX = "model-gateway:v1:limits:"
# Refusal reasons: the Tenant field that sets each limit, and its unit.
LIMITS = {
    "requests": ("requests_per_minute", "requests per minute"),
    "tokens": ("tokens_per_minute", "tokens per minute"),
    "concurrency": ("max_concurrent", "concurrent requests"),
    "daily_tokens": ("daily_tokens", "tokens per UTC day"),
}
_WINDOW_S = 60.0
# Epoch seconds in a float round by ~1e-7 s a step: without slack the last of N requests
# sent at once could be refused. (Also in the Lua below: 60.0001.)
_SLACK_S = 1e-4
_DAY_S = 86_400
_USAGE_MINUTES = 25 * 60
OnFault = Callable[[], None]  # called for each check or release Redis did not answer


class Limiter(Protocol):
    """`admit` checks every limit, then charges one request, the prompt's tokens and a
    concurrency slot (held until release, hold_s at most); it raises RateLimitedError, or
    NotReadyError where it cannot check; None: the key has no per-minute limits. `release`
    frees the slot, charges the tokens used beyond those charged (or gives back) and counts
    usage; it never raises. `usage` sums a key's last window_s seconds, by minute (24 h at
    most)."""

    async def admit(
        self, tenant: Tenant, request_id: str, prompt_tokens: int, hold_s: float
    ) -> Quota | None: ...
    async def release(
        self,
        tenant: Tenant,
        request_id: str,
        charged_tokens: int,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None: ...
    async def usage(self, name: str, window_s: float) -> dict[str, Any]: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


def create_limiter(
    redis_url: str | None, settings: RateLimitSettings, *, on_fault: OnFault | None = None
) -> Limiter:
    if redis_url is None:
        return MemoryLimiter()
    return RedisLimiter(redis_url, settings, on_fault=on_fault)


def _limits(t: Tenant) -> list[int | None]:
    return [getattr(t, attribute) for attribute, _ in LIMITS.values()]


def _bucket(limit: int | None, ahead_s: float) -> tuple[int | None, int | None, float | None]:
    if limit is None:
        return None, None, None
    return limit, max(0, math.floor((_WINDOW_S + _SLACK_S - ahead_s) * limit / _WINDOW_S)), ahead_s


def _quota(t: Tenant, requests_ahead_s: float, tokens_ahead_s: float) -> Quota | None:
    if t.requests_per_minute is None and t.tokens_per_minute is None:
        return None
    return Quota(
        *_bucket(t.requests_per_minute, requests_ahead_s),
        *_bucket(t.tokens_per_minute, tokens_ahead_s),
    )


def _error(
    t: Tenant, reason: str, wait_s: float, prompt_tokens: int, quota: Quota | None
) -> RateLimitedError:
    attribute, unit = LIMITS[reason]
    limit = getattr(t, attribute)
    message = f"Key {t.name!r} is over its limit of {limit} {unit}."
    if reason == "tokens" and prompt_tokens > limit:
        message = f"The prompt's {prompt_tokens} tokens are larger than the limit of key "
        message += f"{t.name!r}, {limit} {unit}: it can never pass."
        wait_s = _WINDOW_S  # waiting cannot help; this only keeps clients from retrying at once
    retry_after_s = max(1, math.ceil(wait_s))
    return RateLimitedError(message, reason=reason, retry_after_s=retry_after_s, quota=quota)


def _minutes(now: float, window_s: float) -> range:
    """The minute buckets that overlap the last window_s seconds (24 h at most)."""
    window_s = min(max(window_s, 0.0), float(_DAY_S))
    return range(int((now - window_s) // 60), int(now // 60) + 1)


def _usage(counts: Mapping[str, int], window_s: float) -> dict[str, Any]:
    used = {
        kind: counts.get(kind, 0) for kind in ("requests", "prompt_tokens", "completion_tokens")
    }
    rejected = {reason: counts.get(f"rejected:{reason}", 0) for reason in LIMITS}
    return {**used, "rejected": rejected, "window_s": window_s}


@dataclass
class _KeyState:
    requests_tat: float = 0.0
    tokens_tat: float = 0.0
    slots: dict[str, float] = field(default_factory=dict)  # request id → expiry
    day: int = 0  # since the epoch, UTC
    day_tokens: int = 0
    usage: dict[int, Counter[str]] = field(default_factory=dict)  # minute → counts


class MemoryLimiter:
    """The limits of one process (no redis_url); `clock` is wall time, for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: defaultdict[str, _KeyState] = defaultdict(_KeyState)

    async def admit(
        self, tenant: Tenant, request_id: str, prompt_tokens: int, hold_s: float
    ) -> Quota | None:
        if not any(_limits(tenant)):
            return None
        now, s, t = self._clock(), self._keys[tenant.name], tenant
        self._new_day(s, now)
        for expired in [rid for rid, expiry in s.slots.items() if expiry <= now]:
            del s.slots[expired]
        requests_ahead_s = max(s.requests_tat, now) - now
        tokens_ahead_s = max(s.tokens_tat, now) - now
        rpm, tpm, cost = t.requests_per_minute, t.tokens_per_minute, prompt_tokens
        refusal: tuple[str, float] | None = None
        if rpm and requests_ahead_s + _WINDOW_S / rpm > _WINDOW_S + _SLACK_S:
            refusal = "requests", requests_ahead_s + _WINDOW_S / rpm - _WINDOW_S
        elif tpm and tokens_ahead_s + cost * _WINDOW_S / tpm > _WINDOW_S + _SLACK_S:
            refusal = "tokens", tokens_ahead_s + cost * _WINDOW_S / tpm - _WINDOW_S
        elif t.max_concurrent is not None and len(s.slots) >= t.max_concurrent:
            refusal = "concurrency", 1.0
        elif t.daily_tokens is not None and s.day_tokens + cost > t.daily_tokens:
            refusal = "daily_tokens", _DAY_S - now % _DAY_S
        if refusal is not None:
            self._count(s, now, f"rejected:{refusal[0]}", 1)
            quota = _quota(t, requests_ahead_s, tokens_ahead_s)
            raise _error(t, refusal[0], refusal[1], prompt_tokens, quota)
        if rpm:
            requests_ahead_s += _WINDOW_S / rpm
            s.requests_tat = now + requests_ahead_s
        if tpm:
            tokens_ahead_s += cost * _WINDOW_S / tpm
            s.tokens_tat = now + tokens_ahead_s
        if t.max_concurrent is not None:
            s.slots[request_id] = now + hold_s
        s.day_tokens += cost
        return _quota(t, requests_ahead_s, tokens_ahead_s)

    async def release(
        self,
        tenant: Tenant,
        request_id: str,
        charged_tokens: int,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        now, s = self._clock(), self._keys[tenant.name]
        s.slots.pop(request_id, None)
        extra = prompt_tokens + completion_tokens - charged_tokens
        if tenant.tokens_per_minute:
            s.tokens_tat = max(
                max(s.tokens_tat, now) + extra * _WINDOW_S / tenant.tokens_per_minute, now
            )
        self._new_day(s, now)
        s.day_tokens = max(0, s.day_tokens + extra)
        self._count(s, now, "requests", 1)
        self._count(s, now, "prompt_tokens", prompt_tokens)
        self._count(s, now, "completion_tokens", completion_tokens)

    async def usage(self, name: str, window_s: float) -> dict[str, Any]:
        buckets = self._keys[name].usage if name in self._keys else {}
        total: Counter[str] = Counter()
        for minute in _minutes(self._clock(), window_s):
            total.update(buckets.get(minute, {}))
        return _usage(total, window_s)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._keys.clear()

    @staticmethod
    def _new_day(s: _KeyState, now: float) -> None:
        if s.day != now // _DAY_S:
            s.day, s.day_tokens = int(now // _DAY_S), 0

    @staticmethod
    def _count(s: _KeyState, now: float, field_name: str, n: int) -> None:
        minute = int(now // 60)
        s.usage.setdefault(minute, Counter())[field_name] += n
        while next(iter(s.usage)) < minute - _USAGE_MINUTES:  # buckets come in time order
            del s.usage[next(iter(s.usage))]


# KEYS: requests TAT, tokens TAT, concurrency set, daily counter, usage bucket.
# ARGV: requests/min, tokens/min, max concurrent, daily tokens (0: no limit), request id,
# prompt tokens, hold_s. Returns {reason ('' when admitted), wait_s, and how far each TAT is
# ahead of now}. 60.0001 is _WINDOW_S + _SLACK_S.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local conc, daily, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local function num(x) return string.format('%.17g', x) end
local function ahead(key) return math.max(tonumber(redis.call('GET', key) or 0), now) - now end
local r_ahead, t_ahead = ahead(KEYS[1]), ahead(KEYS[2])
local reason, wait = '', 0
if rpm > 0 and r_ahead + 60 / rpm > 60.0001 then
  reason, wait = 'requests', r_ahead + 60 / rpm - 60
elseif tpm > 0 and t_ahead + cost * 60 / tpm > 60.0001 then
  reason, wait = 'tokens', t_ahead + cost * 60 / tpm - 60
else
  if conc > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
  if conc > 0 and redis.call('ZCARD', KEYS[3]) >= conc then
    reason, wait = 'concurrency', 1
  elseif daily > 0 and tonumber(redis.call('GET', KEYS[4]) or 0) + cost > daily then
    reason, wait = 'daily_tokens', 86400 - now % 86400
  end
end
if reason ~= '' then
  redis.call('HINCRBY', KEYS[5], 'rejected:' .. reason, 1)
  redis.call('EXPIRE', KEYS[5], 90000)
  return {reason, num(wait), num(r_ahead), num(t_ahead)}
end
local function charge(key, ahead_s)
  redis.call('SET', key, num(now + ahead_s), 'PX', math.ceil(ahead_s * 1000) + 1)
end
if rpm > 0 then r_ahead = r_ahead + 60 / rpm; charge(KEYS[1], r_ahead) end
if tpm > 0 and cost > 0 then t_ahead = t_ahead + cost * 60 / tpm; charge(KEYS[2], t_ahead) end
if conc > 0 then
  local hold_ms = math.ceil(tonumber(ARGV[7]) * 1000)
  redis.call('ZADD', KEYS[3], now + hold_ms / 1000, ARGV[5])
  if redis.call('PTTL', KEYS[3]) < hold_ms then redis.call('PEXPIRE', KEYS[3], hold_ms) end
end
if daily > 0 and cost > 0 then
  redis.call('INCRBY', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], 172800)
end
return {'', '0', num(r_ahead), num(t_ahead)}
"""

# KEYS: tokens TAT, concurrency set, daily counter, usage bucket. ARGV: tokens/min (0: no
# limit), daily budget (0: none), request id, tokens to charge (negative: give back), prompt
# tokens, completion tokens.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tpm, daily, extra = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[3])
if tpm > 0 and extra ~= 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now) + extra * 60 / tpm
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1)
  else
    redis.call('DEL', KEYS[1])
  end
end
if daily > 0 and extra ~= 0 then
  if redis.call('INCRBY', KEYS[3], ARGV[4]) < 0 then redis.call('SET', KEYS[3], 0) end
  redis.call('EXPIRE', KEYS[3], 172800)
end
redis.call('HINCRBY', KEYS[4], 'requests', 1)
redis.call('HINCRBY', KEYS[4], 'prompt_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[4], 'completion_tokens', ARGV[6])
redis.call('EXPIRE', KEYS[4], 90000)
"""


class _RedisFault(Exception):
    pass


def _keys(name: str, *kinds: str) -> list[str]:
    """One hash tag per API key: its keys share a Redis Cluster slot, as a script needs."""
    now = time.time()
    buckets = {"daily": f"daily:{int(now // _DAY_S)}", "usage": f"usage:{int(now // 60)}"}
    return [f"{KEY_PREFIX}{{{name}}}:{buckets.get(kind, kind)}" for kind in kinds]


class RedisLimiter:
    """The limits of every replica that shares this Redis."""

    def __init__(
        self, url: str, settings: RateLimitSettings, *, on_fault: OnFault | None = None
    ) -> None:
        self._timeout_s = settings.timeout_ms / 1000
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),  # a retry would blow the deadline
            health_check_interval=0,
        )
        self._admit = self._client.register_script(_ADMIT)
        self._release = self._client.register_script(_RELEASE)
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._fail_open = settings.on_redis_error == "open"
        # Open, while Redis does not answer: each process's own limits, rather than none.
        self._fallback = MemoryLimiter()
        self._fallen_back: set[str] = set()  # request ids admitted by the fallback
        self._on_fault = on_fault
        self.faults = 0  # as on_fault

    async def admit(
        self, tenant: Tenant, request_id: str, prompt_tokens: int, hold_s: float
    ) -> Quota | None:
        if not any(_limits(tenant)):
            return None
        keys = _keys(tenant.name, "requests", "tokens", "concurrency", "daily", "usage")
        args = [limit or 0 for limit in _limits(tenant)] + [request_id, prompt_tokens, hold_s]
        try:
            reply = await self._run(self._admit, keys, args)
        except _RedisFault as exc:
            self._fault()
            if not self._fail_open:
                raise NotReadyError(f"cannot check rate limits: {exc}") from exc
            quota = await self._fallback.admit(tenant, request_id, prompt_tokens, hold_s)
            self._fallen_back.add(request_id)
            return quota
        reason, wait_s, requests_ahead_s, tokens_ahead_s = reply
        quota = _quota(tenant, float(requests_ahead_s), float(tokens_ahead_s))
        if reason:
            raise _error(tenant, reason.decode(), float(wait_s), prompt_tokens, quota)
        return quota

    async def release(
        self,
        tenant: Tenant,
        request_id: str,
        charged_tokens: int,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        if request_id in self._fallen_back:
            self._fallen_back.discard(request_id)
            await self._fallback.release(
                tenant, request_id, charged_tokens, prompt_tokens, completion_tokens
            )
            return
        t = tenant
        keys = _keys(t.name, "tokens", "concurrency", "daily", "usage")
        extra = prompt_tokens + completion_tokens - charged_tokens
        args = [t.tokens_per_minute or 0, t.daily_tokens or 0, request_id, extra]
        # A fault is logged and counted; the slot then expires after hold_s.
        with contextlib.suppress(_RedisFault):
            await self._run(self._release, keys, [*args, prompt_tokens, completion_tokens])

    async def usage(self, name: str, window_s: float) -> dict[str, Any]:
        total: Counter[str] = Counter()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for minute in _minutes(time.time(), window_s):
                    pipe.hgetall(f"{KEY_PREFIX}{{{name}}}:usage:{minute}")
                for bucket in await pipe.execute():
                    total.update({k.decode(): int(v) for k, v in bucket.items()})
        except (RedisError, OSError) as exc:
            raise NotReadyError(f"cannot read usage: {type(exc).__name__}: {exc}") from exc
        return _usage(total, window_s)

    async def start(self) -> None:
        """Load the scripts now: the first requests would otherwise pay for it, within
        their 50 ms. A Redis that is down is only logged: requests find it later."""
        try:
            for script in (self._admit, self._release):
                await self._client.script_load(script.script)
        except (RedisError, OSError) as exc:
            logger.warning("rate limits: redis is not answering yet: %s", exc)

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> list[bytes]:
        """The script's reply within the deadline, else _RedisFault."""
        if self._breaker.is_open:
            raise _RedisFault("redis circuit open after repeated failures")
        try:
            # The socket timeouts bound each read; this bounds the whole call (connecting,
            # reloading the script after a Redis restart).
            async with asyncio.timeout(self._timeout_s):
                reply = await script(keys, args)
        except (RedisError, OSError) as exc:  # OSError includes the TimeoutError
            self._breaker.failed()
            logger.warning("rate limits: redis failed: %s: %s", type(exc).__name__, exc)
            raise _RedisFault(f"redis: {type(exc).__name__}: {exc}") from exc
        self._breaker.succeeded()
        return list(reply or [])

    def _fault(self) -> None:
        self.faults += 1
        if self._on_fault is not None:
            self._on_fault()
