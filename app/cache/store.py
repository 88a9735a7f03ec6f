"""Response cache: an optimisation, never a dependency.

`ResponseCache` has two implementations: `MemoryResponseCache` (LRU bounded by bytes, the
embedded default) and `RedisResponseCache` (shared by replicas). Both store the same bytes:
a versioned JSON document of the finished generation and its tokens, so a hit can be
replayed as a stream with the same chunks as the live one. Faults surface as `CacheError`;
the gateway then serves the request uncached.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from app.breaker import CircuitBreaker
from app.domain import Generation, SamplingParams, TokenEvent

KEY_PREFIX = "model-gateway:response:v1:"
# 2: tokens keep their logprob and an upstream's choices, the generation its body.
FORMAT_VERSION = 2


class CacheError(Exception):
    """The cache could not answer (down, slow, circuit open) or held an unusable value."""


@dataclass(frozen=True)
class CachedGeneration:
    generation: Generation
    tokens: tuple[TokenEvent, ...]


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedGeneration | None: ...
    async def set(self, key: str, value: CachedGeneration, ttl_s: float) -> None: ...
    async def close(self) -> None: ...


def is_cacheable(sampling: SamplingParams) -> bool:
    """Only deterministic requests: greedy, or sampled with an explicit seed."""
    return sampling.greedy or sampling.seed is not None


def cache_key(
    model_identity: str,
    prompt: list[int] | str,
    max_tokens: int,
    stop: tuple[str, ...],
    sampling: SamplingParams,
    extra: dict[str, Any] | None = None,
) -> str:
    """A key over everything that changes the output, in a canonical form: the same
    generation asked through different APIs (or with parameters that cannot matter, like
    top_p under greedy decoding) shares one entry."""
    if sampling.greedy:
        decoding: dict[str, Any] = {"greedy": True}
    else:
        decoding = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "seed": sampling.seed,
        }
    decoding.update(
        repetition_penalty=sampling.repetition_penalty,
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
    )
    canonical = json.dumps(
        {
            "model": model_identity,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stop": sorted(set(stop)),
            "decoding": decoding,
            "extra": extra or {},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def encode_value(value: CachedGeneration) -> bytes:
    g = value.generation
    return json.dumps(
        {
            "version": FORMAT_VERSION,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "stop_cause": g.stop_cause,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "tokens": [_token_entry(t) for t in value.tokens],
            "body": g.body,
        },
        separators=(",", ":"),
    ).encode()


def decode_value(raw: bytes) -> CachedGeneration:
    """Parse a stored value; anything corrupt or foreign raises CacheError."""
    try:
        data = json.loads(raw)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}")
        tokens = tuple(_token(*entry) for entry in data["tokens"])
        body = data["body"]
        if body is not None and not (
            isinstance(body, dict) and isinstance(body.get("choices"), list)
        ):
            raise ValueError("the body is not a completion")
        generation = Generation(
            text=str(data["text"]),
            finish_reason=data["finish_reason"],
            stop_cause=data["stop_cause"],
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            body=body,
        )
        if generation.finish_reason not in ("stop", "length") or generation.stop_cause not in (
            "eos_token",
            "stop_sequence",
            "length",
        ):
            raise ValueError("unknown finish reason")
        if "".join(t.text for t in tokens) != generation.text[: sum(len(t.text) for t in tokens)]:
            raise ValueError("tokens do not spell the text")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CacheError(f"unusable cached value: {exc}") from exc
    return CachedGeneration(generation, tokens)


def _token_entry(t: TokenEvent) -> list[Any]:
    """[id, text, logprob, choices], the trailing nulls left out."""
    entry: list[Any] = [t.token_id, t.text, t.logprob, t.choices]
    while entry[-1] is None:
        entry.pop()
    return entry


def _token(
    token_id: int,
    text: str,
    logprob: float | None = None,
    choices: list[dict[str, Any]] | None = None,
) -> TokenEvent:
    if choices is not None and not all(isinstance(c, dict) for c in choices):
        raise ValueError("a token's choices are not objects")
    return TokenEvent(
        token_id=int(token_id),
        text=str(text),
        logprob=None if logprob is None else float(logprob),
        choices=None if choices is None else tuple(choices),
    )


class MemoryResponseCache:
    """In-process LRU bounded by the total size of its values, with per-entry TTL."""

    def __init__(self, max_bytes: int, max_value_bytes: int) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_bytes = max_bytes
        self._max_value_bytes = max_value_bytes
        self._bytes = 0

    async def get(self, key: str) -> CachedGeneration | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, raw = entry
        if time.monotonic() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return decode_value(raw)

    async def set(self, key: str, value: CachedGeneration, ttl_s: float) -> None:
        raw = encode_value(value)
        if len(raw) > min(self._max_value_bytes, self._max_bytes):
            return
        self._drop(key)
        self._entries[key] = (time.monotonic() + ttl_s, raw)
        self._bytes += len(raw)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


class RedisResponseCache:
    """Redis with short socket timeouts and a circuit breaker: after `breaker_failures`
    faults in a row, Redis is not asked for `breaker_reset_s`, then one request tries it
    again. A dead or frozen Redis so costs a request at most one timeout, and usually none."""

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: float,
        max_value_bytes: int,
        breaker_failures: int,
        breaker_reset_s: float,
    ) -> None:
        timeout_s = timeout_ms / 1000
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._max_value_bytes = max_value_bytes
        self._breaker = CircuitBreaker(breaker_failures, breaker_reset_s)

    async def get(self, key: str) -> CachedGeneration | None:
        self._check_breaker()
        try:
            raw = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self._failed(exc)
        self._breaker.succeeded()
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = raw.encode()
        if len(raw) > self._max_value_bytes:
            raise CacheError(f"cached value of {len(raw)} bytes is over the limit")
        return decode_value(raw)

    async def set(self, key: str, value: CachedGeneration, ttl_s: float) -> None:
        raw = encode_value(value)
        if len(raw) > self._max_value_bytes:
            return
        self._check_breaker()
        try:
            await self._client.set(key, raw, px=max(1, int(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            self._failed(exc)
        self._breaker.succeeded()

    async def close(self) -> None:
        await self._client.aclose()

    def _check_breaker(self) -> None:
        if self._breaker.is_open:
            raise CacheError("redis circuit open after repeated failures")

    def _failed(self, exc: BaseException) -> NoReturn:
        self._breaker.failed()
        raise CacheError(f"redis: {type(exc).__name__}: {exc}") from exc
