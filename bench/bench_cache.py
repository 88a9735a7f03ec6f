"""Response cache: hit latency and throughput, Redis vs memory, and the cost of a miss.

  hit latency   sequential hits; server-side time from the `x-total-time` header (arrival
                to the reply being built), streaming and not
  hit rate      `wrk` (Debian package) with N connections against one uvicorn worker
  miss cost     the lookup and store a miss adds, timed in-process around the cache itself

Run: `python bench/bench_cache.py` (needs redis-server and wrk on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from app.cache.store import CachedGeneration, MemoryResponseCache, RedisResponseCache, cache_key  # noqa: E402
from app.domain import Generation, SamplingParams, TokenEvent  # noqa: E402
from bench.bench_serving import percentile  # noqa: E402
from tests.live_server import live_server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MODEL = "smollm2-135m-instruct"
BODY = {"model": MODEL, "prompt": "What is the capital of France?", "max_tokens": 32,
        "temperature": 0}  # fmt: skip


def hit_latency(url: str, requests: int, stream: bool) -> tuple[float, float]:
    """p50, p99 in ms: server-side for JSON replies, client-side for streams."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/v1/completions", json=BODY)  # store
        for _ in range(requests):
            if stream:
                started = time.perf_counter()
                with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
                    assert r.headers["x-cache"] == "hit"
                    for _ in r.iter_bytes():
                        pass
                times.append(1000 * (time.perf_counter() - started))
            else:
                reply = client.post("/v1/completions", json=BODY)
                assert reply.headers["x-cache"] == "hit"
                times.append(float(reply.headers["x-total-time"]))
    return percentile(times, 0.5), percentile(times, 0.99)


def wrk_rate(url: str, connections: int, seconds: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{json.dumps(BODY)}]]\n"
        )
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
         url + "/v1/completions"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    assert match, result.stdout
    assert errors is None, result.stdout
    return float(match.group(1))


async def miss_cost_ms(cache: MemoryResponseCache | RedisResponseCache, n: int, tag: str) -> float:
    """Median of a miss's lookup plus the store that follows it, in ms."""
    tokens = tuple(TokenEvent(i, f" word{i}", None) for i in range(64))
    value = CachedGeneration(
        Generation("".join(t.text for t in tokens), "length", "length", 40, 64), tokens
    )
    times = []
    for i in range(n):
        key = cache_key(f"bench-{tag}", [i, 1, 2], 64, (), SamplingParams(temperature=0))
        started = time.perf_counter()
        assert await cache.get(key) is None
        await cache.set(key, value, 60)
        times.append(1000 * (time.perf_counter() - started))
    await cache.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    redis_server = RedisServer()
    redis_server.start()
    variant = {"name": MODEL, "model_path": str(ROOT / "models" / MODEL)}
    results: dict[str, list[float]] = {}
    try:
        with (
            live_server([variant], log_level="warning") as memory_url,
            live_server([variant], log_level="warning", redis_url=redis_server.url) as redis_url,
        ):
            for _ in range(args.rounds):
                for name, url in (("memory", memory_url), ("redis", redis_url)):
                    p50, p99 = hit_latency(url, args.requests, stream=False)
                    s50, s99 = hit_latency(url, args.requests // 5, stream=True)
                    rate = wrk_rate(url, args.connections, args.seconds)
                    for metric, value in (("hit p50 ms", p50), ("hit p99 ms", p99),
                                          ("stream hit p50 ms (client)", s50),
                                          ("stream hit p99 ms (client)", s99),
                                          ("hit req/s", rate)):  # fmt: skip
                        results.setdefault(f"{name} {metric}", []).append(value)
                    print(f"{name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, stream p50 {s50:.2f}, "
                          f"{rate:.0f} req/s", flush=True)  # fmt: skip
        for round_index in range(args.rounds):
            memory = MemoryResponseCache(64 << 20, 1 << 20)
            redis_cache = RedisResponseCache(redis_server.url, timeout_ms=200,
                                             max_value_bytes=1 << 20, breaker_failures=3,
                                             breaker_reset_s=5)  # fmt: skip
            results.setdefault("memory miss cost ms", []).append(
                asyncio.run(miss_cost_ms(memory, 1000, str(round_index))))  # fmt: skip
            results.setdefault("redis miss cost ms", []).append(
                asyncio.run(miss_cost_ms(redis_cache, 1000, str(round_index))))  # fmt: skip
    finally:
        redis_server.kill()
    print("| measure | median of rounds | rounds |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        runs = ", ".join(f"{v:.3g}" for v in values)
        print(f"| {name} | {statistics.median(values):.3g} | {runs} |")


if __name__ == "__main__":
    main()
