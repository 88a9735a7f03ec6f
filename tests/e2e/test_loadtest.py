"""A short locust run (every user class, ~20 s) against the live embedded default: no
failures, every scenario exercised, streamed TTFT reported, tokens counted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from tests.live_server import ROOT


def test_a_short_load_test_has_no_failures(server: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "--host", server, "--users", "6", "--spawn-rate", "6",
         "--run-time", "20s", "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    aggregated = stats[("", "Aggregated")]
    assert int(aggregated["Request Count"]) > 20
    assert int(aggregated["Failure Count"]) == 0
    names = {name for _, name in stats}
    assert {"chat", "completion", "chat (stream)", "chat (greedy, repeated)",
            "chat (A/B)"} <= names  # fmt: skip
    assert float(stats[("TTFT", "chat (stream)")]["Median Response Time"]) > 0
    tokens = json.loads(Path(f"{prefix}_tokens.json").read_text())
    assert tokens["tokens_per_s"] > 0
    assert tokens["variants"] == {"smollm2-135m-instruct": tokens["variants"].get(
        "smollm2-135m-instruct", 0)}  # fmt: skip
