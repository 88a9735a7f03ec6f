"""What a gateway in front of a worker adds: the same requests straight to a worker, through
a gateway whose variant is that worker (`backend: openai`), and through a minimal proxy (the
floor for a Python proxy on this machine: `minimal_proxy.py`), interleaved in rotating order,
and the gateway process's CPU time per request.

Run: `python bench/bench_gateway_overhead.py` (default model, CPU). On a machine with cores to
spare, `--worker-cpus 0-3 --gateway-cpus 4,5 --client-cpus 6,7` gives each its own, as in a
deployment; `--model-path` serves another CTranslate2 model; `--baseline-tree DIR` adds a
second gateway run from another checkout (`git worktree add DIR REF`), to measure a change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_serving import percentile, run_clients  # noqa: E402
from tests.live_server import ServerProcess, free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def cpus(text: str | None) -> set[int] | None:
    """'0-3,6' -> {0, 1, 2, 3, 6}"""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def pin(pid: int, cores: set[int] | None) -> None:
    """Every thread of `pid` (a CTranslate2 worker has several) onto `cores`."""
    if cores:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cores)


def start_minimal_proxy(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.minimal_proxy:app", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "UPSTREAM": upstream})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the minimal proxy did not start") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model-path", help="a CTranslate2 model directory (default: ours)")
    parser.add_argument("--worker-cpus")
    parser.add_argument("--gateway-cpus", help="the gateway's and the minimal proxy's cores")
    parser.add_argument("--client-cpus")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout whose gateway to add")
    args = parser.parse_args()
    pin(os.getpid(), cpus(args.client_cpus))

    worker_variant: dict[str, Any] = {"name": MODEL}
    if args.model_path:
        worker_variant["model_path"] = args.model_path
    if args.worker_cpus:  # one generation per core it has, not per core of the machine
        worker_variant["inter_threads"] = len(cpus(args.worker_cpus) or ())
    worker = ServerProcess([worker_variant], log_level="warning", cache__enabled="false")
    worker.start()
    variant = {"name": MODEL, "backend": "openai", "upstream": {"replicas": [worker.url]}}
    gateways = {"gateway": ServerProcess([variant], log_level="warning")}
    if args.baseline_tree:
        baseline = ServerProcess([variant], cwd=args.baseline_tree.resolve(), log_level="warning")
        gateways["baseline"] = baseline
    proxy: subprocess.Popen[bytes] | None = None
    cpu_s = dict.fromkeys(gateways, 0.0)
    try:
        for gateway in gateways.values():
            gateway.start()
            pin(gateway.pid, cpus(args.gateway_cpus))
        proxy, proxy_url = start_minimal_proxy(worker.url)
        pin(worker.pid, cpus(args.worker_cpus))
        pin(proxy.pid, cpus(args.gateway_cpus))
        targets = {"direct": worker.url, "minimal proxy": proxy_url}
        targets.update({name: gateway.url for name, gateway in gateways.items()})
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        latency: dict[str, list[float]] = {name: [] for name in targets}
        rates: dict[str, list[float]] = {name: [] for name in ["direct", *gateways]}
        names = list(targets)
        with httpx.Client(timeout=60) as client:
            for url in targets.values():  # warm-up
                client.post(url + "/v1/completions", json=body, headers=NO_CACHE)
            for _ in range(args.rounds):
                cpu_before = {name: gateway.cpu_seconds() for name, gateway in gateways.items()}
                for i in range(args.requests):
                    turn = i % len(names)
                    for name in names[turn:] + names[:turn]:  # each goes first as often
                        started = time.perf_counter()
                        reply = client.post(targets[name] + "/v1/completions", json=body,
                                            headers=NO_CACHE)  # fmt: skip
                        latency[name].append(1000 * (time.perf_counter() - started))
                        assert reply.status_code == 200, reply.text
                for name, gateway in gateways.items():
                    cpu_s[name] += gateway.cpu_seconds() - cpu_before[name]
                for name in rates:
                    run = asyncio.run(run_clients(targets[name], name, args.concurrency, 64, 1))
                    rates[name].append(run.tok_per_s)
    finally:
        if proxy is not None:
            proxy.kill()
        for gateway in gateways.values():
            gateway.stop()
        worker.stop()
    direct = latency["direct"]
    print(f"| measure ({len(direct)} requests each, 4 tokens) | {' | '.join(names)} |")
    print("| --- " * (len(names) + 1) + "|")
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        row = " | ".join(f"{percentile(latency[name], q):.2f}" for name in names)
        print(f"| latency {label} ms | {row} |")
    # Each request ran right beside the others of its turn: the differences are free of the
    # minute-to-minute drift that moves them all, so their median is the steadier estimate.
    row = " | ".join(
        f"{statistics.median(b - a for a, b in zip(direct, latency[name], strict=True)):.2f}"
        for name in names[1:]
    )
    print(f"| added p50 ms, median of paired differences | | {row} |")
    row = " | ".join(
        f"{percentile(latency[name], 0.99) - percentile(direct, 0.99):.2f}" for name in names[1:]
    )
    print(f"| added p99 ms (difference of the p99s) | | {row} |")
    row = " | ".join(f"{1000 * cpu_s[name] / len(direct):.2f} ms" for name in gateways)
    print(f"| gateway process CPU per request | | | {row} |")
    rate = {name: statistics.median(runs) for name, runs in rates.items()}
    row = " | ".join(f"{rate[n]:.0f} (ratio {rate[n] / rate['direct']:.2f})" for n in gateways)
    print(
        f"| tok/s, {args.concurrency} streaming clients, 64 tokens (median of {args.rounds}) "
        f"| {rate['direct']:.0f} | | {row} |"
    )


if __name__ == "__main__":
    main()
