"""Tenancy's cost and guarantees, in three parts (BENCHMARKS.md, "Tenancy"):

  overhead  µs per request that keys and limits add to the in-process pipeline
            (bench_pipeline's app called as an ASGI function, a stand-in backend): auth off;
            a key without limits; a key with limits, in-process; the same shared through a
            real redis-server. Each mode in its own process, modes in turn for --rounds.
  accuracy  a key limited to R requests/minute, hammered by 64 clients through 4 gateway
            processes sharing one Redis, in front of an upstream that answers at once:
            requests admitted per 60 s window against R, and the checks that failed open.
  priority  an interactive key's TTFT while a batch key's 48 streams saturate the default
            model, with the keys in their classes and with both `standard`, in turn.

Run: `python bench/bench_tenancy.py {overhead,accuracy,priority} [--help]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from app.tenancy.keys import hash_secret  # noqa: E402
from bench.bench_pipeline import InstantBackend, completion_call  # noqa: E402
from bench.bench_serving import PROMPTS, chat_prompt, percentile  # noqa: E402
from tests.live_server import ServerProcess, free_port, metric_value  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def key(name: str, priority: str = "standard", **limits: int) -> dict[str, Any]:
    """A key's settings; its secret is its name."""
    return {"name": name, "sha256": hash_secret(name), "priority": priority, "limits": limits}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}", **NO_CACHE}


# ---- overhead ----------------------------------------------------------------------------

UNREACHABLE = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}
MODES: dict[str, dict[str, Any]] = {
    "auth off": {"auth": "off"},
    "key, no limits": {"auth": "required", "keys": [key("bench")]},
    "key + limits, in-process": {"auth": "required", "keys": [key("bench", **UNREACHABLE)]},
    "key + limits, Redis": {"auth": "required", "keys": [key("bench", **UNREACHABLE)]},
}


async def measure(mode: str, redis_url: str, requests: int, batches: int) -> dict[str, Any]:
    """Per batch of `requests` sequential requests, µs per request with every task they left
    (the limits' release) run to its end; and each request's own µs."""
    from asgi_lifespan import LifespanManager

    import app.main
    from app.settings import Settings, VariantSettings

    app.main.create_backend = InstantBackend  # type: ignore[assignment]
    shared = {"redis_url": redis_url} if "Redis" in mode else {}
    variants = [VariantSettings(name="m", model_path="-")]
    settings = Settings(variants=variants, cache={"enabled": False}, **MODES[mode], **shared)
    asgi = app.main.create_app(settings)
    key_header = [(b"authorization", b"Bearer bench")] if settings.auth != "off" else []
    call = completion_call(asgi, key_header)

    async def one() -> float:
        started = time.perf_counter()
        await call()
        return time.perf_counter() - started

    async def drain(idle_tasks: int) -> None:
        """Until only the tasks of an idle app are left (releases are tasks of their own)."""
        deadline = time.monotonic() + 5
        while len(asyncio.all_tasks()) > idle_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0)

    batch_us, request_us = [], []
    async with LifespanManager(asgi):
        await asyncio.sleep(0.1)
        idle_tasks = len(asyncio.all_tasks())
        for _ in range(500):
            await one()
        await drain(idle_tasks)
        for _ in range(batches):
            started = time.perf_counter()
            times = [await one() for _ in range(requests)]
            await drain(idle_tasks)
            batch_us.append(1e6 * (time.perf_counter() - started) / requests)
            request_us += [1e6 * t for t in times]
    return {"batch_us": batch_us, "request_us": request_us}


def overhead(args: argparse.Namespace) -> None:
    if args.child:
        result = asyncio.run(measure(args.child, args.redis_url, args.requests, args.batches))
        print(json.dumps(result))
        return
    redis_server = RedisServer()
    redis_server.start()
    names = list(MODES)
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    try:
        for round_ in range(args.rounds):
            turn = round_ % len(names)
            for name in names[turn:] + names[:turn]:  # each goes first as often
                command = [sys.executable, __file__, "overhead", "--child", name]
                command += ["--redis-url", redis_server.url, "--requests", str(args.requests)]
                command += ["--batches", str(args.batches)]
                env = {**os.environ, "MODEL_GATEWAY_LOG_LEVEL": "warning"}
                out = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                times = r["request_us"]
                p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
                rows[name].append((statistics.median(r["batch_us"]), p50, p99))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {rows[n][-1][0]:.0f}" for n in names))
    finally:
        redis_server.kill()
    print(
        f"\n{args.rounds} rounds x {args.batches} batches x {args.requests} requests; µs "
        "(medians over rounds; added: median of the per-round differences from auth off)"
    )
    print("| mode | per request, batch mean | added | request p50 | added | request p99 |")
    print("| --- | --- | --- | --- | --- | --- |")
    off = rows["auth off"]
    for name, per_round in rows.items():
        mean, p50, p99 = (statistics.median(column) for column in zip(*per_round, strict=True))
        added_mean = statistics.median(r[0] - o[0] for r, o in zip(per_round, off, strict=True))
        added_p50 = statistics.median(r[1] - o[1] for r, o in zip(per_round, off, strict=True))
        print(
            f"| {name} | {mean:.1f} | {added_mean:+.1f} | {p50:.1f} | {added_p50:+.1f} | "
            f"{p99:.1f} |"
        )


# ---- accuracy ----------------------------------------------------------------------------


async def instant_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An OpenAI-compatible upstream that answers every completion at once with one token
    (`uvicorn bench.bench_tenancy:instant_upstream`)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = b"{}"
    if scope["method"] == "POST":
        body = json.dumps(
            {
                "choices": [{"index": 0, "text": " a", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    asgi_app = "bench.bench_tenancy:instant_upstream"
    command = [sys.executable, "-m", "uvicorn", asgi_app, "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the instant upstream did not start")


FAULTS = "model_gateway_rate_limit_errors_total"


async def hammer(
    urls: list[str], clients: int, duration_s: float
) -> tuple[list[tuple[float, int]], list[tuple[float, float]]]:
    """`clients` closed-loop clients spread over `urls` for duration_s: (seconds since the
    start, status) of every reply, and every 15 s the gateways' Redis faults so far."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    replies: list[tuple[float, int]] = []
    faults: list[tuple[float, float]] = []
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in urls]
    started = time.monotonic()

    async def client(index: int) -> None:
        session, url = sessions[index % len(urls)], urls[index % len(urls)]
        while time.monotonic() - started < duration_s:
            try:
                async with session.post(
                    url + "/v1/completions", json=body, headers=bearer("limited")
                ) as reply:
                    await reply.read()
                    status = reply.status
            except aiohttp.ClientError:
                status = 0
            replies.append((time.monotonic() - started, status))

    async def count_faults() -> None:
        for at_s in range(0, int(duration_s) + 1, 15):
            await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
            total = await asyncio.to_thread(lambda: sum(metric_value(u, FAULTS) for u in urls))
            faults.append((at_s, total))

    try:
        await asyncio.gather(count_faults(), *(client(i) for i in range(clients)))
    finally:
        for session in sessions:
            await session.close()
    return replies, faults


def accuracy_run(args: argparse.Namespace, timeout_ms: float) -> None:
    redis_server = RedisServer()
    redis_server.start()
    upstream, upstream_url = start_upstream()
    variant = {"name": MODEL, "backend": "openai", "upstream": {"replicas": [upstream_url]}}
    settings = {
        "auth": "required",
        "keys": json.dumps([key("limited", requests_per_minute=args.rpm)]),
        "redis_url": redis_server.url,
        "rate_limits": json.dumps({"timeout_ms": timeout_ms}),
        "cache__enabled": "false",
        "log_level": "error",  # a failed check logs a warning each
    }
    gateways = [ServerProcess([variant], **settings) for _ in range(args.gateways)]
    try:
        for gateway in gateways:
            gateway.start()
        replies, faults = asyncio.run(hammer([g.url for g in gateways], args.clients, args.seconds))
    finally:
        for gateway in gateways:
            gateway.stop()
        upstream.kill()
        redis_server.kill()
    r, seconds = args.rpm, int(args.seconds)
    statuses = Counter(status for _, status in replies)
    print(
        f"\ntimeout_ms {timeout_ms:g}, R = {r}/min: {len(replies) / seconds:.0f} replies/s "
        f"offered, statuses {dict(statuses)}, Redis faults {faults[-1][1]:.0f}"
    )

    def window(start_s: int, end_s: int) -> tuple[int, int, float]:
        """Replies, admitted, Redis faults (15 s resolution) in [start_s, end_s)."""
        inside = [status for t, status in replies if start_s <= t < end_s]
        counted = dict(faults)
        return len(inside), inside.count(200), counted[end_s] - counted[start_s]

    print("| window | replies | admitted | admitted / R | Redis faults |")
    print("| --- | --- | --- | --- | --- |")
    for start_s in range(0, seconds - 59, 15):
        n, admitted, failed = window(start_s, start_s + 60)
        print(
            f"| {start_s}-{start_s + 60} s | {n} | {admitted} | {admitted / r:.4f} "
            f"({admitted / r - 1:+.2%}) | {failed:.0f} |"
        )
    if seconds > 60:
        n, admitted, failed = window(60, seconds)
        per_minute = admitted * 60 / (seconds - 60)
        print(
            f"| 60-{seconds} s, per minute | {n} | {per_minute:.0f} | "
            f"{per_minute / r:.4f} ({per_minute / r - 1:+.2%}) | {failed:.0f} |"
        )


def accuracy(args: argparse.Namespace) -> None:
    for timeout_ms in args.timeout_ms:
        accuracy_run(args, timeout_ms)


# ---- priority ----------------------------------------------------------------------------

CONFIGS = {
    "priorities": [key("batch", "batch"), key("interactive", "interactive")],
    "no priorities": [key("batch"), key("interactive")],
}


async def stream(
    session: aiohttp.ClientSession, url: str, who: str, max_tokens: int, prompt: str
) -> tuple[float, int]:
    """(seconds to the first chunk with text, chunks with text) of one streamed completion."""
    body = {
        "model": MODEL,
        "prompt": chat_prompt(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    sent, first, chunks = time.perf_counter(), 0.0, 0
    async with session.post(url + "/v1/completions", json=body, headers=bearer(who)) as reply:
        assert reply.status == 200, (reply.status, await reply.text())
        async for line in reply.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"]:
                    first = first or time.perf_counter() - sent
                    chunks += 1
    return first, chunks


async def contend(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The batch key's streams keep the engine busy while the interactive key sends one
    request at a time, at random moments."""
    rng = random.Random(0)
    done = asyncio.Event()
    batch_chunks = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def batch_client(index: int) -> None:
            nonlocal batch_chunks
            n = index
            while not done.is_set():
                n += 1
                prompt = PROMPTS[n % len(PROMPTS)]
                _, chunks = await stream(session, url, "batch", args.batch_tokens, prompt)
                batch_chunks += chunks  # (`+= await` would read the total before awaiting)

        batch = [asyncio.create_task(batch_client(i)) for i in range(args.batch_clients)]
        await asyncio.sleep(args.warmup_s)
        chunks_before, started = batch_chunks, time.perf_counter()
        ttfts = []
        for i in range(args.interactive_requests):
            await asyncio.sleep(rng.uniform(0, 0.5))
            prompt = PROMPTS[i % len(PROMPTS)]
            ttft, _ = await stream(session, url, "interactive", args.interactive_tokens, prompt)
            ttfts.append(ttft)
        batch_tok_s = (batch_chunks - chunks_before) / (time.perf_counter() - started)
        done.set()
        await asyncio.gather(*batch)
    return {
        "p50": percentile(ttfts, 0.5),
        "p95": percentile(ttfts, 0.95),
        "batch_tok_s": batch_tok_s,
    }


def priority(args: argparse.Namespace) -> None:
    names = list(CONFIGS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            server = ServerProcess(
                None,
                auth="required",
                keys=json.dumps(CONFIGS[name]),
                cache__enabled="false",
                log_level="warning",
            )
            try:
                server.start()
                run = asyncio.run(contend(server.url, args))
            finally:
                server.stop()
            runs[name].append(run)
            print(
                f"round {round_ + 1}, {name}: TTFT p50 {1000 * run['p50']:.0f} ms, "
                f"p95 {1000 * run['p95']:.0f} ms, batch key {run['batch_tok_s']:.0f} tok/s"
            )
    print(
        f"\n{args.batch_clients} batch streams x {args.batch_tokens} tokens; "
        f"{args.interactive_requests} interactive requests x {args.interactive_tokens} tokens"
    )
    print("| config | TTFT p50 ms (median) | TTFT p95 ms (median) | p95 per round | batch tok/s |")
    print("| --- | --- | --- | --- | --- |")
    p95 = {}
    for name, per_round in runs.items():
        p95[name] = statistics.median(r["p95"] for r in per_round)
        p50 = statistics.median(r["p50"] for r in per_round)
        rounds = ", ".join(f"{1000 * r['p95']:.0f}" for r in per_round)
        tok_s = statistics.median(r["batch_tok_s"] for r in per_round)
        print(f"| {name} | {1000 * p50:.0f} | {1000 * p95[name]:.0f} | {rounds} | {tok_s:.0f} |")
    print(f"p95 without / with priorities: {p95['no priorities'] / p95['priorities']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parts = parser.add_subparsers(dest="part", required=True)
    p = parts.add_parser("overhead", help="µs per request of keys and limits")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--requests", type=int, default=2000, help="per batch")
    p.add_argument("--batches", type=int, default=5, help="per process")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.set_defaults(run=overhead)
    p = parts.add_parser("accuracy", help="admitted requests per minute against the limit")
    p.add_argument("--rpm", type=int, default=3000, help="the key's requests_per_minute, R")
    p.add_argument("--gateways", type=int, default=4)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=int, default=150, help="a multiple of 15")
    p.add_argument(
        "--timeout-ms",
        type=float,
        nargs="+",
        default=[50.0],
        help="rate_limits.timeout_ms: one run each",
    )
    p.set_defaults(run=accuracy)
    p = parts.add_parser("priority", help="interactive TTFT beside a saturating batch key")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-clients", type=int, default=48)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--interactive-requests", type=int, default=40)
    p.add_argument("--interactive-tokens", type=int, default=16)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.set_defaults(run=priority)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
