"""Throughput and latency over time from a locust run's `*_stats_history.csv` (written with
`--csv PREFIX --csv-full-history`), as one PNG.

    python loadtest/plot.py loadtest/results/load_stats_history.csv loadtest/results/load.png

Requests/s counts HTTP requests only (not the locustfile's TTFT and STREAM timings); the
latency panel shows the whole reply (JSON requests and streams to their end) and the
streams' time to first token.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else float("nan")


def main(history: Path, out: Path) -> None:
    with history.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{history}: empty")
    start = int(rows[0]["Timestamp"])
    users: dict[int, float] = {}
    http: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    latency: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        t = int(row["Timestamp"]) - start
        users[t] = number(row["User Count"])
        if row["Type"] in ("POST", "GET"):
            http[t][0] += number(row["Requests/s"])
            http[t][1] += number(row["Failures/s"])
        if row["Name"] == "chat" and row["Type"] == "POST":
            latency["chat (JSON) p50"][t] = number(row["50%"]) / 1000
            latency["chat (JSON) p95"][t] = number(row["95%"]) / 1000
        elif row["Type"] == "TTFT":
            latency["stream TTFT p50"][t] = number(row["50%"]) / 1000
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, dpi=90)
    times = sorted(http)
    top.plot(times, [http[t][0] for t in times], label="requests/s")
    top.plot(times, [http[t][1] for t in times], label="failures/s", color="tab:red")
    right = top.twinx()
    right.plot(sorted(users), [users[t] for t in sorted(users)], color="tab:gray", linestyle=":")
    right.set_ylabel("users (dotted)")
    top.set_ylabel("per second")
    top.legend(loc="upper left")
    top.set_title(f"locust: {history.stem.removesuffix('_stats_history')}")
    for (label, series), style in zip(latency.items(), ("-", "--", "-."), strict=False):
        ts = sorted(series)
        bottom.plot(ts, [series[t] for t in ts], style, label=label)
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
