"""What a gateway in front of a worker adds: the same requests straight to a worker and
through a gateway whose variant is that worker (`backend: openai`), interleaved (A B B A, so
neither goes first more often), and the gateway process's CPU time per request.

Run: `python bench/bench_gateway_overhead.py` (default model, CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serving import run_clients  # noqa: E402
from tests.live_server import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    worker = ServerProcess(log_level="warning", cache__enabled="false")  # a worker: no cache
    worker.start()
    variant = {"name": MODEL, "backend": "openai", "upstream": {"replicas": [worker.url]}}
    gateway_process = ServerProcess([variant], log_level="warning")
    gateway_process.start()
    gateway = gateway_process.url
    cpu_s = 0.0
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        latency: dict[str, list[float]] = {"direct": [], "gateway": []}
        rates: dict[str, list[float]] = {"direct": [], "gateway": []}
        with httpx.Client(timeout=60) as client:
            for url in (worker.url, gateway):  # warm-up
                client.post(url + "/v1/completions", json=body, headers=NO_CACHE)
            for _ in range(args.rounds):
                cpu_before = gateway_process.cpu_seconds()
                for i in range(args.requests):
                    pair = [("direct", worker.url), ("gateway", gateway)]
                    for name, url in pair if i % 2 else reversed(pair):
                        started = time.perf_counter()
                        reply = client.post(url + "/v1/completions", json=body,
                                            headers=NO_CACHE)  # fmt: skip
                        latency[name].append(1000 * (time.perf_counter() - started))
                        assert reply.status_code == 200
                cpu_s += gateway_process.cpu_seconds() - cpu_before
                for name, url in (("direct", worker.url), ("gateway", gateway)):
                    run = asyncio.run(run_clients(url, name, args.concurrency, 64, 1))
                    rates[name].append(run.tok_per_s)
    finally:
        gateway_process.stop()
        worker.stop()
    direct, through = latency["direct"], latency["gateway"]
    print("| measure | direct | through gateway | added |")
    print("| --- | --- | --- | --- |")
    for label, q in (("p50 ms", 0.5), ("p99 ms", 0.99)):
        d, g = percentile(direct, q), percentile(through, q)
        print(f"| latency {label} ({len(direct)} requests, 4 tokens) | {d:.2f} | {g:.2f} | "
              f"{g - d:.2f} |")  # fmt: skip
    cpu_ms = 1000 * cpu_s / len(through)
    print(f"| gateway process CPU per request | | {cpu_ms:.2f} ms | |")
    d_rate, g_rate = statistics.median(rates["direct"]), statistics.median(rates["gateway"])
    print(
        f"| tok/s, {args.concurrency} streaming clients, 64 tokens (median of "
        f"{args.rounds}) | {d_rate:.0f} | {g_rate:.0f} | ratio {g_rate / d_rate:.2f} |"
    )


if __name__ == "__main__":
    main()
