"""Load for an OpenAI-compatible server, spread over several client processes (one asyncio
process holding hundreds of connections becomes the bottleneck itself).

python load.py URL MODEL CONCURRENCY TOTAL [--stream] [--processes N]
Prints one JSON line: output tokens/s, request latency p50/p95, TTFT p50 (streaming).
Tokens are the server's `usage` (streams ask for it with `stream_options`), not a count of
chunks: a server may send several tokens in one chunk. The client does as little as it can
per chunk (aiohttp, no JSON parse but the last), so that it takes little CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time
from typing import Any

import aiohttp

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def prompt(rng: random.Random, words: int = 32) -> str:
    return " ".join(f"w{rng.randint(3, 31999)}" for _ in range(words))


async def client(
    args: Any, index: int, concurrency: int, total: int
) -> list[tuple[float, float, int]]:
    rng = random.Random(index)
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=NO_CACHE) as c:

        async def one() -> tuple[float, float, int]:
            body: dict[str, Any] = {
                "model": args.model,
                "prompt": prompt(rng),
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if args.stream:
                body.update(stream=True, stream_options={"include_usage": True})
            async with sem:
                started = time.perf_counter()
                async with c.post(args.url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    if not args.stream:
                        usage = (await r.json())["usage"]
                        elapsed = time.perf_counter() - started
                        return elapsed, elapsed, usage["completion_tokens"]
                    first, last = None, b""
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            if first is None:
                                first = time.perf_counter() - started
                            last = line
                usage = json.loads(last[6:])["usage"]  # the last chunk carries the usage
                return time.perf_counter() - started, first or 0.0, usage["completion_tokens"]

        results = await asyncio.gather(*(one() for _ in range(total)), return_exceptions=True)
        return [r if isinstance(r, tuple) else (0.0, 0.0, -1) for r in results]


def worker(args: Any, index: int, concurrency: int, total: int, start_at: float, out: Any) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    results = asyncio.run(client(args, index, concurrency, total))
    out.put((results, time.time()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("concurrency", type=int)
    p.add_argument("total", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    n = min(args.processes, args.concurrency)
    out: Any = multiprocessing.Queue()
    start_at = time.time() + 1.0  # every process starts together
    procs = [
        multiprocessing.Process(
            target=worker, args=(args, i, args.concurrency // n, args.total // n, start_at, out)
        )
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    finished = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    results = [r for rs, _ in finished for r in rs]
    wall = max(end for _, end in finished) - start_at
    errors = sum(1 for r in results if r[2] < 0)
    results = [r for r in results if r[2] >= 0]
    tokens = sum(r[2] for r in results)
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    print(
        json.dumps(
            {
                "url": args.url,
                "concurrency": args.concurrency,
                "total": args.total,
                "stream": args.stream,
                "errors": errors,
                "tokens": tokens,
                "wall_s": wall,
                "tok_per_s": tokens / wall,
                "lat_p50_s": lat[len(lat) // 2],
                "lat_p95_s": lat[int(len(lat) * 0.95) - 1],
                "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
