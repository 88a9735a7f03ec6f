"""Throughput and latency over time from a locust run's `*_stats_history.csv` (written with
`--csv PREFIX --csv-full-history`), as one PNG.

    python loadtest/plot.py loadtest/results/load_stats_history.csv loadtest/results/load.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(history: Path, out: Path) -> None:
    rows = [r for r in csv.DictReader(history.open()) if r["Name"] == "Aggregated"]
    if not rows:
        sys.exit(f"{history}: no Aggregated rows")
    start = int(rows[0]["Timestamp"])
    t = [int(r["Timestamp"]) - start for r in rows]

    def column(name: str) -> list[float]:
        return [float(r[name]) if r[name] not in ("", "N/A") else float("nan") for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, dpi=90)
    top.plot(t, column("Requests/s"), label="requests/s")
    top.plot(t, column("Failures/s"), label="failures/s", color="tab:red")
    users = top.twinx()
    users.plot(t, column("User Count"), label="users", color="tab:gray", linestyle=":")
    users.set_ylabel("users")
    top.set_ylabel("per second")
    top.legend(loc="upper left")
    top.set_title(f"locust: {history.stem.removesuffix('_stats_history')}")
    for percentile, style in (("50%", "-"), ("95%", "--")):
        bottom.plot(t, [v / 1000 for v in column(percentile)], style, label=f"p{percentile[:-1]}")
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
