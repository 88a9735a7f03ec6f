"""Shadow copies: a sampled share of an experiment's requests also goes to a shadow variant,
in the background, and the two outputs are compared when both are done.

The primary never waits for, fails with, or is changed by its shadow: a copy is a task of
its own, started after routing; at most `max_concurrency` copies per shadow variant run at
once and the rest are dropped (and counted), so a stalled shadow holds a bounded amount of
work and never starves the others. A client that disconnects cancels its primary, never the copy.

Similarity is the normalized Levenshtein similarity over word tokens (words and punctuation
marks): 1 - edits / max(length), 1.0 for identical outputs. Words rather than model tokens,
so that variants with different tokenizers compare on the same footing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import IO, Any

from rapidfuzz.distance import Levenshtein

from app.domain import GenerationRequest, RequestContext
from app.experiments.report import Comparison, ComparisonOutcome, Outcome, ReportWindow
from app.metrics import Metrics
from app.settings import ShadowSettings

logger = logging.getLogger(__name__)

_WORDS = re.compile(r"\w+|[^\w\s]")
# A primary that neither ends nor fails within its deadline and this margin is given up on.
_PRIMARY_GRACE_S = 5.0


def similarity(a: str, b: str) -> float:
    return float(Levenshtein.normalized_similarity(_WORDS.findall(a), _WORDS.findall(b)))


def compare(primary: Outcome, shadow: Outcome) -> Comparison:
    if primary.status != "ok":
        return Comparison(shadow.variant, "primary_failed")
    if shadow.status != "ok":
        return Comparison(shadow.variant, "shadow_failed")
    outcome: ComparisonOutcome = "match" if primary.text == shadow.text else "mismatch"

    def diff(a: float | None, b: float | None) -> float | None:
        # A cache hit's latency says nothing about the primary variant.
        return b - a if a is not None and b is not None and primary.generated else None

    return Comparison(
        shadow=shadow.variant,
        outcome=outcome,
        similarity=similarity(primary.text, shadow.text),
        length_ratio=(
            shadow.completion_tokens / primary.completion_tokens
            if primary.completion_tokens
            else None
        ),
        latency_diff_s=diff(primary.latency_s, shadow.latency_s),
        ttft_diff_s=diff(primary.ttft_s, shadow.ttft_s),
    )


class Pair:
    """The primary's side of a shadow pair: the runner waits on it."""

    def __init__(self) -> None:
        self._primary: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def primary_done(self, outcome: Outcome) -> None:
        if not self._primary.done():
            self._primary.set_result(outcome)

    async def primary(self, timeout_s: float) -> Outcome:
        """The primary's outcome; a primary still unfinished after `timeout_s` counts as
        cancelled (e.g. its reply was never started)."""
        try:
            return await asyncio.wait_for(self._primary, timeout_s)
        except TimeoutError:
            return Outcome(variant="", status="cancelled")


class ShadowRunner:
    def __init__(self, settings: ShadowSettings, metrics: Metrics, window: ReportWindow) -> None:
        self._max_concurrency = settings.max_concurrency
        self._log_prompts = settings.log_prompts
        self._log: IO[str] | None = None
        if settings.log_path is not None:
            settings.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = settings.log_path.open("a", encoding="utf-8")
        self._metrics = metrics
        self._window = window
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}  # by shadow variant

    def launch(
        self,
        experiment: str,
        request: GenerationRequest,
        context: RequestContext,
        shadow: str,
        run: Coroutine[Any, Any, Outcome],
    ) -> Pair | None:
        """Start `run` (the shadow's generation) and its comparison with the primary, which
        reports to the returned `Pair`; None when the copy was dropped."""
        tasks = self._tasks.setdefault(shadow, set())
        if len(tasks) >= self._max_concurrency:
            run.close()
            self._record(experiment, Comparison(shadow, "dropped"))
            return None
        pair = Pair()
        task = asyncio.create_task(self._compare(experiment, request, context, pair, run))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return pair

    async def _compare(
        self,
        experiment: str,
        request: GenerationRequest,
        context: RequestContext,
        pair: Pair,
        run: Coroutine[Any, Any, Outcome],
    ) -> None:
        try:
            shadow = await run
            timeout_s = max(0.0, context.deadline - time.monotonic()) + _PRIMARY_GRACE_S
            primary = await pair.primary(timeout_s)
            comparison = compare(primary, shadow)
            self._record(experiment, comparison)
            if self._log is not None:
                self._write(experiment, request, context, primary, shadow, comparison)
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never take anything down with it
            logger.exception("shadow comparison for request %s failed", context.request_id)

    def _record(self, experiment: str, comparison: Comparison) -> None:
        self._window.add_comparison(experiment, comparison)
        self._metrics.shadow_comparisons_total.labels(
            experiment, comparison.shadow, comparison.outcome
        ).inc()
        if comparison.similarity is not None:
            self._metrics.shadow_similarity.labels(experiment, comparison.shadow).observe(
                comparison.similarity
            )

    def _write(
        self,
        experiment: str,
        request: GenerationRequest,
        context: RequestContext,
        primary: Outcome,
        shadow: Outcome,
        comparison: Comparison,
    ) -> None:
        assert self._log is not None
        line: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": context.request_id,
            "experiment": experiment,
            "outcome": comparison.outcome,
            "similarity": comparison.similarity,
            "length_ratio": comparison.length_ratio,
            "latency_diff_s": comparison.latency_diff_s,
            "ttft_diff_s": comparison.ttft_diff_s,
            "primary": _logged(primary),
            "shadow": _logged(shadow),
        }
        if self._log_prompts:
            line["prompt"] = _prompt(request)
        # One write per line: appends from several processes do not interleave.
        self._log.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._log.flush()

    async def close(self) -> None:
        tasks = [task for shadow_tasks in self._tasks.values() for task in shadow_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._log is not None:
            self._log.close()


def _logged(outcome: Outcome) -> dict[str, Any]:
    return {
        "variant": outcome.variant,
        "status": outcome.status,
        "text": outcome.text,
        "finish_reason": outcome.finish_reason,
        "completion_tokens": outcome.completion_tokens,
        "latency_s": outcome.latency_s,
        "ttft_s": outcome.ttft_s,
        "cache": outcome.cache,
        "error": outcome.error,
    }


def _prompt(request: GenerationRequest) -> Any:
    if request.messages is not None:
        return [{"role": m.role, "content": m.content} for m in request.messages]
    return request.prompt if request.prompt is not None else request.prompt_token_ids
