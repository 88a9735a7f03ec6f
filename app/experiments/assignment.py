"""Which variant serves a request, and which shadows get a copy: pure functions, no I/O.

Sticky choice is weighted rendezvous hashing: every variant draws a score from a hash of
(user key, variant name), scaled by its weight, and the best score wins. The share of users
on a variant is its share of the weights; a user stays on one variant while the weights stay;
and when one variant's weight changes, only users moving to or from that variant move (from
90/10 to 80/20, a tenth of the users go from A to B and nobody from B to A). Unlike ranges
laid out end to end, this stays true for any number of variants and any order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

_TWO_64 = float(2**64)


@dataclass(frozen=True)
class Assignment:
    experiment: str
    variant: str  # answers the request
    shadows: tuple[str, ...] = ()  # get a copy


def _exponential(key: str, variant: str) -> float:
    """A deterministic draw from Exp(1) for this (key, variant)."""
    digest = hashlib.blake2b(f"{variant}\x00{key}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / _TWO_64  # in (0, 1]
    return -math.log(uniform)


def choose_variant(
    weights: Mapping[str, float], key: str | None, rng: random.Random | None = None
) -> str:
    """The variant for a request: sticky on `key` when there is one, else random by weight.
    Variants of weight 0 are never chosen; at least one weight must be positive."""
    candidates = {name: w for name, w in weights.items() if w > 0}
    if not candidates:
        raise ValueError("no variant has a positive weight")
    if key is None:
        names = list(candidates)
        return (rng or random).choices(names, weights=[candidates[n] for n in names])[0]
    # The minimum of Exp(1)/w over variants falls on each with probability w / sum(w).
    return min(candidates, key=lambda name: _exponential(key, name) / candidates[name])


def sample_shadows(
    sample_rates: Mapping[str, float], rng: random.Random | None = None
) -> list[str]:
    """The shadow variants that get a copy of this request, each drawn on its own."""
    draw = (rng or random).random
    return [name for name, rate in sample_rates.items() if rate > 0 and draw() < rate]
