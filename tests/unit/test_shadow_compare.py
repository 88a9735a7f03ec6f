"""Comparing a shadow's output with its primary's."""

from __future__ import annotations

import pytest

from app.experiments.report import Outcome
from app.experiments.shadow import compare, similarity


def ok(variant: str, text: str, tokens: int = 5, latency: float = 1.0, ttft: float = 0.1,
       cache: str | None = "miss") -> Outcome:  # fmt: skip
    return Outcome(variant, "ok", latency, ttft, tokens, cache, text, "stop")


def test_similarity_is_one_minus_normalized_word_edit_distance() -> None:
    assert similarity("The capital is Paris.", "The capital is Paris.") == 1.0
    # Four words and "." each: one substitution in five.
    assert similarity("The capital is Paris.", "The capital is Lyon.") == pytest.approx(4 / 5)
    assert similarity("a b c d", "w x y z") == 0.0
    assert similarity("", "") == 1.0


def test_identical_outputs_match() -> None:
    c = compare(ok("a", "Paris.", latency=1.0, ttft=0.2), ok("s", "Paris.", latency=1.5, ttft=0.1))
    assert c.outcome == "match"
    assert c.similarity == 1.0
    assert c.length_ratio == 1.0
    assert c.latency_diff_s == pytest.approx(0.5)
    assert c.ttft_diff_s == pytest.approx(-0.1)


def test_different_outputs_mismatch_with_a_score_and_length_ratio() -> None:
    c = compare(ok("a", "It is Paris.", tokens=4), ok("s", "Paris.", tokens=2))
    assert c.outcome == "mismatch"
    assert c.similarity is not None
    assert 0 < c.similarity < 1
    assert c.length_ratio == 0.5


def test_a_cached_primary_gives_no_latency_difference() -> None:
    c = compare(ok("a", "x", cache="hit"), ok("s", "x"))
    assert c.outcome == "match"
    assert c.latency_diff_s is None
    assert c.ttft_diff_s is None


def test_failures_on_either_side() -> None:
    failed = Outcome("s", "error", error="boom")
    assert compare(ok("a", "x"), failed).outcome == "shadow_failed"
    assert compare(Outcome("a"), ok("s", "x")).outcome == "primary_failed"  # cancelled
    assert compare(Outcome("a", "client_error"), failed).outcome == "primary_failed"
