"""Head-of-line blocking by long generations: two streaming requests for 8,000 tokens each
run (default model, CPU: two engine slots), while two clients send short requests (16
tokens) one after another; how long the short ones wait for an engine slot (`X-Queue-Time`)
and how many time out, with the long-request lane (`batching.long_request_tokens`, default)
and without it (null), alternately. A short client gives up after 30 s.

Run: `python bench/bench_long_requests.py [--rounds 2] [--seconds 40]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serving import percentile  # noqa: E402
from tests.live_server import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
LONG = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 8000, "ignore_eos": True,
        "temperature": 0, "stream": True}  # fmt: skip
SHORT = {"model": MODEL, "prompt": "Say hello.", "max_tokens": 16, "temperature": 0}
SHORT_PATIENCE_S = 30.0


def long_request(url: str, started: threading.Event) -> None:
    """Runs until the server is stopped under it."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=LONG, headers=NO_CACHE,
                          timeout=600) as reply:  # fmt: skip
            for _ in reply.iter_lines():
                started.set()
    except httpx.HTTPError:
        pass


def short_requests(url: str, seconds: float) -> list[tuple[int, float]]:
    """(status, queue wait in s) of each short request sent within `seconds`; a client gives
    up after SHORT_PATIENCE_S (status 0)."""
    results = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=SHORT_PATIENCE_S) as client:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                reply = client.post("/v1/completions", json=SHORT, headers=NO_CACHE)
            except httpx.TimeoutException:
                results.append((0, SHORT_PATIENCE_S))
                continue
            queue = reply.headers.get("x-queue-time")
            waited = float(queue) / 1000 if queue else time.monotonic() - started
            results.append((reply.status_code, waited))
    return results


def run(long_request_tokens: int | None, seconds: float) -> list[tuple[int, float]]:
    variant: dict[str, Any] = {
        "name": MODEL,
        "batching": {"long_request_tokens": long_request_tokens},
    }
    # Deadlines long enough for the long requests to run through the measurement.
    server = ServerProcess([variant], log_level="warning", request_timeout_s="900")
    server.start()
    pool = ThreadPoolExecutor(4)
    try:
        # Both sent; with the lane the second waits for the first's slot, without it they
        # take both slots.
        started = threading.Event()
        for _ in range(2):
            pool.submit(long_request, server.url, started)
        assert started.wait(60), "no long request started"
        time.sleep(2)  # both admitted to the engine's queue
        shorts = [pool.submit(short_requests, server.url, seconds) for _ in range(2)]
        return [r for future in shorts for r in future.result()]
    finally:
        server.stop()  # ends the long requests
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    modes = {"without the lane": None, "with the lane (512)": 512}
    p95: dict[str, list[float]] = {name: [] for name in modes}
    print(f"| round | mode | short requests | 200 | given up after {SHORT_PATIENCE_S:g} s "
          "| wait p50 s | wait p95 s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for round_ in range(args.rounds):
        for name, tokens in modes.items():
            results = run(tokens, args.seconds)
            waits = [w for _, w in results]
            ok = sum(status == 200 for status, _ in results)
            timeouts = sum(status == 0 for status, _ in results)
            p95[name].append(percentile(waits, 0.95))
            print(f"| {round_ + 1} | {name} | {len(results)} | {ok} | {timeouts} | "
                  f"{percentile(waits, 0.5):.3f} | {percentile(waits, 0.95):.3f} |")  # fmt: skip
    for name, values in p95.items():
        print(
            f"{name}: short requests' wait p95, median of rounds: {statistics.median(values):.3f} s"
        )


if __name__ == "__main__":
    main()
