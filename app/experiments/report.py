"""The experiment report: how each variant did over the last `window_s`, and how its shadows
compared with the primaries they copied.

Each process keeps its own window (bounded in time and count); a report is computed when
asked for, so recording a request costs one append.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from app.experiments.state import ExperimentState
from app.settings import ExperimentSettings

_T = TypeVar("_T")
OutcomeStatus = Literal["ok", "error", "client_error", "cancelled"]
ComparisonOutcome = Literal["match", "mismatch", "shadow_failed", "primary_failed", "dropped"]


@dataclass
class Outcome:
    """How one request to one variant went."""

    variant: str
    status: OutcomeStatus = "cancelled"  # until it ends otherwise
    latency_s: float | None = None  # arrival to the final event
    ttft_s: float | None = None
    completion_tokens: int = 0
    cache: str | None = None  # hit | miss | bypass; None where no cache is configured
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def generated(self) -> bool:
        """Generated for this request (not replayed from the cache)."""
        return self.status == "ok" and self.cache != "hit"


@dataclass(frozen=True)
class Comparison:
    shadow: str
    outcome: ComparisonOutcome
    similarity: float | None = None
    length_ratio: float | None = None  # shadow / primary completion tokens
    latency_diff_s: float | None = None  # shadow - primary (primaries that were generated)
    ttft_diff_s: float | None = None


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, `q` in [0, 1]; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


class ReportWindow:
    def __init__(self, window_s: float, max_records: int = 100_000) -> None:
        self.window_s = window_s
        self._max_records = max_records
        self._outcomes: dict[str, deque[tuple[float, Outcome]]] = {}
        self._comparisons: dict[str, deque[tuple[float, Comparison]]] = {}

    def add(self, experiment: str, outcome: Outcome) -> None:
        records = self._outcomes.setdefault(experiment, deque(maxlen=self._max_records))
        # Without the text: the report needs none, and a full window would hold megabytes.
        records.append((time.monotonic(), replace(outcome, text="", error=None)))

    def add_comparison(self, experiment: str, comparison: Comparison) -> None:
        records = self._comparisons.setdefault(experiment, deque(maxlen=self._max_records))
        records.append((time.monotonic(), comparison))

    def _recent(self, records: deque[tuple[float, _T]] | None) -> list[_T]:
        if records is None:
            return []
        since = time.monotonic() - self.window_s
        while records and records[0][0] < since:
            records.popleft()
        return [record for _, record in records]

    def report(self, config: ExperimentSettings, state: ExperimentState) -> dict[str, Any]:
        outcomes = self._recent(self._outcomes.get(config.name))
        comparisons = self._recent(self._comparisons.get(config.name))
        variants = []
        for variant in config.variants:
            mine = [o for o in outcomes if o.variant == variant.name]
            variants.append(
                {
                    "name": variant.name,
                    "backend": variant.backend,
                    "role": "shadow" if variant.name in state.shadows else "primary",
                    "weight": state.weights.get(variant.name, 0.0),
                    "sample_rate": state.shadows.get(variant.name),
                    **self._variant_stats(mine),
                }
            )
        shadows = [
            {"variant": name, "sample_rate": rate,
             **self._shadow_stats([c for c in comparisons if c.shadow == name])}
            for name, rate in state.shadows.items()
        ]  # fmt: skip
        return {"window_s": self.window_s, "variants": variants, "shadows": shadows}

    @staticmethod
    def _variant_stats(outcomes: list[Outcome]) -> dict[str, Any]:
        ok = [o for o in outcomes if o.status == "ok"]
        errors = sum(o.status == "error" for o in outcomes)
        ended = sum(o.status != "cancelled" for o in outcomes)
        generated = [o for o in ok if o.generated and o.ttft_s is not None]
        # Decode speed of one request: tokens after the first over the time they took.
        decode_tokens = sum(o.completion_tokens - 1 for o in generated if o.completion_tokens > 1)
        decode_s = sum(
            (o.latency_s or 0) - (o.ttft_s or 0) for o in generated if o.completion_tokens > 1
        )
        looked_up = [o for o in ok if o.cache in ("hit", "miss")]
        latencies = [o.latency_s for o in ok if o.latency_s is not None]
        return {
            "requests": len(outcomes),
            "errors": errors,
            "client_errors": sum(o.status == "client_error" for o in outcomes),
            "cancelled": sum(o.status == "cancelled" for o in outcomes),
            "error_rate": _ratio(errors, ended),
            "latency_p50_s": _percentile(latencies, 0.5),
            "latency_p95_s": _percentile(latencies, 0.95),
            "ttft_p50_s": _percentile([o.ttft_s for o in generated if o.ttft_s is not None], 0.5),
            "output_tokens_per_s": _ratio(decode_tokens, decode_s),
            "cache_hit_ratio": _ratio(sum(o.cache == "hit" for o in looked_up), len(looked_up)),
        }

    @staticmethod
    def _shadow_stats(comparisons: list[Comparison]) -> dict[str, Any]:
        compared = [c for c in comparisons if c.outcome in ("match", "mismatch")]
        outcomes: dict[str, int] = dict.fromkeys(
            ("match", "mismatch", "shadow_failed", "primary_failed", "dropped"), 0
        )
        for c in comparisons:
            outcomes[c.outcome] += 1

        def values(name: str) -> list[float]:
            return [v for c in compared if (v := getattr(c, name)) is not None]

        similarity = values("similarity")
        return {
            "pairs": len(comparisons),
            "outcomes": outcomes,
            "exact_match_ratio": _ratio(outcomes["match"], len(compared)),
            "similarity_mean": _ratio(sum(similarity), len(similarity)),
            "similarity_p50": _percentile(similarity, 0.5),
            "length_ratio_p50": _percentile(values("length_ratio"), 0.5),
            "latency_diff_p50_s": _percentile(values("latency_diff_s"), 0.5),
            "ttft_diff_p50_s": _percentile(values("ttft_diff_s"), 0.5),
        }
