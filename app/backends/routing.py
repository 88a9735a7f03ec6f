"""Which replica of an upstream answers a request: the routing policies of `openai`
variants. Pure bookkeeping, no I/O; the backend gives each policy the healthy replicas under
their cap and tells it when one leaves rotation.

- `least_outstanding`: the replica with the fewest requests in flight (ties take turns).
- `prefix`: the replica that most likely holds the prompt's prefix in its KV cache. The
  prompt as sent upstream is cut into blocks of `block_bytes` bytes, hashed
  cumulatively (a block's hash covers everything before it); each replica remembers the
  block hashes recently sent to it (LRU of `max_blocks`, forgotten after `ttl_s`). A
  replica scores the share of the prompt's blocks it holds, minus `load_weight` times its
  requests in flight beyond the least loaded replica's, relative to that replica's (+1);
  the best score wins, and a prompt no replica holds goes to the least loaded.
- `session`: the user key (as for the A/B split) picks a replica by rendezvous hashing; a
  replica with more than `(1 + load_epsilon)` times the mean load passes the user on to the
  next in that user's order. Without a user key: the least loaded.

The state is per gateway process: with several processes, each learns prefixes on its
own, so a prefix may be held by as many replicas as there are processes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from app.settings import RoutingSettings


class Routed(Protocol):
    url: str
    outstanding: int


R = TypeVar("R", bound=Routed)


# Why a replica was chosen: the `reason` label of model_gateway_route_decisions_total.
LEAST_OUTSTANDING = "least_outstanding"
PREFIX_HIT = "prefix_hit"
COLD = "cold"
LOAD_OVERRIDE = "load_override"
SESSION = "session"
NO_SESSION = "no_session"


class Router:
    def __init__(self, settings: RoutingSettings, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._turn = 0
        # Per replica URL: block hash -> when it was last sent there.
        self._blocks: dict[str, OrderedDict[bytes, float]] = {}

    @property
    def policy(self) -> str:
        return self._settings.policy

    def choose(self, candidates: Sequence[R], prompt: str, user_key: str | None) -> tuple[R, str]:
        """The replica for a request, and why. `candidates` is not empty."""
        policy = self._settings.policy
        if policy == "prefix":
            return self._by_prefix(candidates, prompt)
        if policy == "session" and user_key is not None:
            return self._by_session(candidates, user_key)
        reason = NO_SESSION if policy == "session" else LEAST_OUTSTANDING
        return self._least_loaded(candidates), reason

    def forget(self, url: str) -> None:
        """The replica left rotation: what it held is no longer worth routing to."""
        self._blocks.pop(url, None)

    def _least_loaded(self, candidates: Sequence[R]) -> R:
        least = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == least]
        self._turn += 1  # one request at a time would otherwise always find the first
        return tied[self._turn % len(tied)]

    def _by_prefix(self, candidates: Sequence[R], prompt: str) -> tuple[R, str]:
        s = self._settings
        hashes = _block_hashes(prompt, s.block_bytes, s.max_prompt_blocks)
        now = self._clock()
        least = min(r.outstanding for r in candidates)
        held = {r.url: self._held(r.url, hashes, now) for r in candidates}
        best_held = max(held.values())
        if best_held == 0:
            chosen, reason = self._least_loaded(candidates), COLD
        else:
            # Load counts against the least loaded replica's, not the mean: a holder can
            # only be so far above a mean it is part of (with two replicas, never enough).
            def score(r: R) -> float:
                excess = (r.outstanding - least) / (least + 1)
                return held[r.url] / len(hashes) - s.load_weight * excess

            chosen = max(candidates, key=score)
            reason = PREFIX_HIT if held[chosen.url] == best_held else LOAD_OVERRIDE
        self._remember(chosen.url, hashes, now)
        return chosen, reason

    def _held(self, url: str, hashes: list[bytes], now: float) -> int:
        """How many of the prompt's leading blocks were sent to `url` within ttl_s."""
        blocks = self._blocks.get(url)
        if not blocks:
            return 0
        held = 0
        for digest in hashes:
            seen = blocks.get(digest)
            if seen is None or now - seen > self._settings.ttl_s:
                break
            held += 1
        return held

    def _remember(self, url: str, hashes: list[bytes], now: float) -> None:
        blocks = self._blocks.setdefault(url, OrderedDict())
        for digest in hashes:
            blocks[digest] = now
            blocks.move_to_end(digest)
        while len(blocks) > self._settings.max_blocks:
            blocks.popitem(last=False)

    def _by_session(self, candidates: Sequence[R], user_key: str) -> tuple[R, str]:
        ranked = sorted(candidates, key=lambda r: _weight(user_key, r.url), reverse=True)
        # Consistent hashing with bounded loads: the mean with this request counted, rounded
        # up, so that a lone request always fits.
        mean = (sum(r.outstanding for r in candidates) + 1) / len(candidates)
        bound = math.ceil((1 + self._settings.load_epsilon) * mean)
        for replica in ranked:
            if replica.outstanding + 1 <= bound:
                return replica, SESSION if replica is ranked[0] else LOAD_OVERRIDE
        return self._least_loaded(candidates), LOAD_OVERRIDE


def _block_hashes(prompt: str, block_bytes: int, max_blocks: int) -> list[bytes]:
    """Cumulative hashes of the prompt's blocks (its last may be partial), at most
    `max_blocks`: the first ones are the ones a prefix cache shares."""
    data = prompt.encode()
    hashes: list[bytes] = []
    digest = b""
    for start in range(0, min(max(len(data), 1), block_bytes * max_blocks), block_bytes):
        digest = hashlib.blake2b(
            digest + data[start : start + block_bytes], digest_size=16
        ).digest()
        hashes.append(digest)
    return hashes


def _weight(user_key: str, url: str) -> bytes:
    return hashlib.blake2b(f"{user_key}\x00{url}".encode(), digest_size=8).digest()
