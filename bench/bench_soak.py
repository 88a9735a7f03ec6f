"""Soak: the default server driven at about twice what it can serve, open loop, for ten
minutes; its resident memory sampled every 10 s, and every reply's status counted (only 200s
and 429s are expected: overload is refused at once, nothing else fails). A disconnect storm
(clients leaving mid-stream) every minute on top.

Run: `python bench/bench_soak.py [--minutes 10] [--rate 40]` (requests/s; the 2-vCPU VM
serves about 20/s of these). `--env MALLOC_ARENA_MAX=2` sets the server's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 32, "temperature": 0.7}  # fmt: skip
MAX_IN_FLIGHT = 2000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(client: httpx.AsyncClient, statuses: collections.Counter[str]) -> None:
    try:
        reply = await client.post("/v1/chat/completions", json=BODY)
        statuses[str(reply.status_code)] += 1
    except httpx.HTTPError as exc:
        statuses[type(exc).__name__] += 1


async def leaver(client: httpx.AsyncClient, statuses: collections.Counter[str]) -> None:
    """A streaming client that leaves after its first chunk."""
    try:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**BODY, "stream": True}) as reply:  # fmt: skip
            statuses[f"{reply.status_code} (left)"] += 1
            async for _ in reply.aiter_lines():
                break
    except httpx.HTTPError as exc:
        statuses[type(exc).__name__] += 1


async def drive(url: str, pid: int, minutes: float, rate: float) -> None:
    statuses: collections.Counter[str] = collections.Counter()
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.monotonic()
        next_sample, next_storm, sent = started, started + 60, 0
        print("| t (s) | RSS MB | replies so far |")
        print("| --- | --- | --- |")
        while (now := time.monotonic()) < started + 60 * minutes:
            due = int((now - started) * rate) - sent
            for _ in range(max(0, min(due, MAX_IN_FLIGHT - len(tasks)))):
                task = asyncio.create_task(one(client, statuses))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if now >= next_storm:  # 200 streams that leave at their first chunk
                for _ in range(200):
                    task = asyncio.create_task(leaver(client, statuses))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                next_storm += 60
            if now >= next_sample:
                print(f"| {now - started:.0f} | {rss_mb(pid):.0f} | {dict(statuses)} |", flush=True)
                next_sample += 10
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
    print(f"| end | {rss_mb(pid):.0f} | {dict(statuses)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    server = ServerProcess(log_level="warning", environ=extra)
    server.start()
    try:
        print(f"server RSS at start: {rss_mb(server.pid):.0f} MB; environment {extra}")
        asyncio.run(drive(server.url, server.pid, args.minutes, args.rate))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
