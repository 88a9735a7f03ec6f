"""Sticky weighted A/B choice and shadow sampling (pure functions)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.experiments.assignment import choose_variant, sample_shadows

KEYS = [f"user-{i}" for i in range(100_000)]


def shares(weights: dict[str, float]) -> dict[str, float]:
    counts = Counter(choose_variant(weights, key) for key in KEYS)
    return {name: counts[name] / len(KEYS) for name in weights}


@pytest.mark.parametrize(
    "weights",
    [{"a": 90, "b": 10}, {"a": 1, "b": 1}, {"a": 50, "b": 30, "c": 20}, {"a": 0.2, "b": 0.8}],
)
def test_split_matches_the_weights_within_one_percent(weights: dict[str, float]) -> None:
    total = sum(weights.values())
    for name, share in shares(weights).items():
        assert share == pytest.approx(weights[name] / total, abs=0.01), (name, share)


def test_a_user_stays_on_one_variant() -> None:
    weights = {"a": 50, "b": 50}
    for key in KEYS[:1000]:
        first = choose_variant(weights, key)
        assert all(choose_variant(weights, key, random.Random(i)) == first for i in range(5))


def test_moving_weight_from_a_to_b_moves_only_the_users_it_must() -> None:
    before = {key: choose_variant({"a": 90, "b": 10}, key) for key in KEYS}
    after = {key: choose_variant({"a": 80, "b": 20}, key) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert len(moved) / len(KEYS) == pytest.approx(0.10, abs=0.01)
    assert all(before[key] == "a" and after[key] == "b" for key in moved)


def test_changing_one_weight_leaves_the_other_variants_users_alone() -> None:
    before = {key: choose_variant({"a": 50, "b": 30, "c": 20}, key) for key in KEYS}
    after = {key: choose_variant({"a": 50, "b": 30, "c": 40}, key) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved
    assert all(after[key] == "c" for key in moved)  # only ever towards the one that grew


def test_zero_weight_is_never_chosen_and_all_zero_is_refused() -> None:
    assert {choose_variant({"a": 0, "b": 1}, key) for key in KEYS[:2000]} == {"b"}
    assert {choose_variant({"a": 0, "b": 1}, None) for _ in range(200)} == {"b"}
    with pytest.raises(ValueError, match="positive weight"):
        choose_variant({"a": 0, "b": 0}, "user")


def test_anonymous_requests_are_assigned_at_random_by_weight() -> None:
    rng = random.Random(7)
    counts = Counter(choose_variant({"a": 75, "b": 25}, None, rng) for _ in range(20_000))
    assert counts["a"] / 20_000 == pytest.approx(0.75, abs=0.015)


def test_shadows_are_sampled_at_their_rates() -> None:
    rng = random.Random(3)
    counts = Counter(
        name for _ in range(20_000) for name in sample_shadows({"s": 0.1, "t": 1.0, "u": 0}, rng)
    )
    assert counts["s"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert counts["t"] == 20_000
    assert counts["u"] == 0
