"""The gateway's replica routing policies (`least_outstanding`, `prefix`, `session`) on two
vLLM servers with prefix caching: TTFT, output tokens/s and vLLM's prefix-cache hit rate.

    python bench/bench_routing.py run --model m \
        --gateway least_outstanding=http://127.0.0.1:9000 \
        --gateway prefix=http://127.0.0.1:9001 --gateway session=http://127.0.0.1:9002 \
        --vllm http://127.0.0.1:8000 --vllm http://127.0.0.1:8001 \
        --rounds 3 --jsonl routing.jsonl --markdown routing.md

One gateway process per policy, each in front of the same vLLM servers (bench/gpu/routing.sh
starts them). Two workloads:

- `shared`: `--tenants` tenants, each with a prefix of `--prefix-tokens` words (a system
  prompt, a few-shot block) that all its requests share, then `--suffix-tokens` words of
  their own; a request's tenant is drawn at random. New prefixes every round.
- `unique`: prompts of the same length with no prefix in common.

Every request names its tenant as `user` (the `session` policy's key). Load: closed loop, a
fixed number of streams (`--concurrency`, spread over `--processes` client processes), each
sending its next request as soon as its last one ends, for `--duration-s`; requests started
in the first `--warmup-s` are left out of the figures (the caches are cold then). TTFT is
the time to the first chunk carrying text; output tokens/s counts the `usage` of requests
that ended within the measured window. Each (workload, policy) is a segment; a round runs
every segment, the policies in a rotated order (A B C, B C A, C A B, ...), and the table
gives medians over rounds.

Before each segment every vLLM's prefix cache is emptied (`POST /reset_prefix_cache`: vLLM
serves it with VLLM_SERVER_DEV_MODE=1), so every policy starts from the same caches. vLLM's
`/metrics` is read when the measured window opens and after the segment: the prefix-cache
hit rate is `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (tokens) over that span,
summed over the servers; the gateway's `model_gateway_route_decisions_total` is read
around each segment too. Prints a Markdown table; `--jsonl` keeps every segment.

`stub` is a CPU stand-in for a vLLM server (a prefix cache of `--blocks` blocks of 16 words,
one prefill at a time at `--prefill-us-per-token`, streamed tokens `--token-ms` apart, the
same metric names and reset endpoint), for a dry run of the whole bench without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

POLICIES = ("least_outstanding", "prefix", "session")
WORKLOADS = ("shared", "unique")
VOCAB = range(3, 32000)  # bench/gpu/mkmodel.py's tokenizer: "w3".."w31999", one token each
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
HITS, QUERIES = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"
VLLM_COUNTERS = (
    HITS,
    QUERIES,
    "vllm:request_success",
    "vllm:num_preemptions",
    "vllm:prompt_tokens",
    "vllm:prompt_tokens_cached",
    "vllm:generation_tokens",
)
DECISIONS = "model_gateway_route_decisions_total"


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.choices(VOCAB, k=n))


# --- the load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """What one client process sends in one segment."""

    url: str
    model: str
    workload: str
    seed: str  # the round's: the same requests for every policy of a round
    streams: range  # global stream indices
    prefixes: list[str]  # per tenant (shared workload)
    prefix_tokens: int
    suffix_tokens: int
    max_tokens: int
    start_at: float  # time.time()
    duration_s: float


# (started, ttft, ended) in seconds from the segment's start (ttft: nan if none), output
# tokens, tenant, error (empty if none)
Record = tuple[float, float, float, int, int, str]


def run_share(share: Share) -> list[Record]:
    return asyncio.run(_run_share(share))


async def _run_share(share: Share) -> list[Record]:
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=len(share.streams) + 8)
    records: list[Record] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=NO_CACHE) as s:
        await asyncio.sleep(max(0.0, share.start_at - time.time()))
        await asyncio.gather(*(_stream(s, share, index, records) for index in share.streams))
    return records


async def _stream(s: aiohttp.ClientSession, share: Share, index: int, out: list[Record]) -> None:
    rng = random.Random(f"{share.seed}:{index}")
    end = share.start_at + share.duration_s
    while time.time() < end:
        tenant = rng.randrange(len(share.prefixes))
        if share.workload == "shared":
            prompt = share.prefixes[tenant] + " " + words(rng, share.suffix_tokens)
        else:
            prompt = words(rng, share.prefix_tokens + share.suffix_tokens)
        body = {
            "model": share.model,
            "prompt": prompt,
            "max_tokens": share.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": f"tenant-{tenant}",
        }
        out.append(await _one(s, share, body, tenant))


async def _one(s: aiohttp.ClientSession, share: Share, body: dict[str, Any], tenant: int) -> Record:
    started = time.time()
    t0 = time.perf_counter()
    first = math.nan
    last = b""
    try:
        async with s.post(share.url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raw = await r.read()
                elapsed = time.perf_counter() - t0
                return _record(
                    share, started, first, elapsed, 0, tenant, f"{r.status} {raw[:80]!r}"
                )
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                if math.isnan(first) and _has_text(line):
                    first = time.perf_counter() - t0
                last = line
        elapsed = time.perf_counter() - t0
        usage = (json.loads(last[6:]).get("usage") or {}) if last else {}
        tokens = int(usage.get("completion_tokens", 0))
        error = "" if tokens and not math.isnan(first) else "no tokens"
        return _record(share, started, first, elapsed, tokens, tenant, error)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        elapsed = time.perf_counter() - t0
        return _record(share, started, first, elapsed, 0, tenant, f"{type(exc).__name__}: {exc}")


def _record(
    share: Share, started: float, ttft: float, elapsed: float, tokens: int, tenant: int, error: str
) -> Record:
    offset = started - share.start_at
    return (offset, ttft, offset + elapsed, tokens, tenant, error[:120])


def _has_text(line: bytes) -> bool:
    try:
        chunk = json.loads(line[6:])
    except ValueError:
        return False
    return any(choice.get("text") for choice in chunk.get("choices") or ())


# --- metrics -----------------------------------------------------------------------------


def parse_metrics(text: str, names: Iterable[str]) -> dict[str, float]:
    """Per name (a counter's `_total` read too), the sum over its label sets."""
    wanted = {}
    for name in names:
        wanted[name] = name
        wanted[name + "_total"] = name
    sums = dict.fromkeys(set(wanted.values()), 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        if name in wanted:
            sums[wanted[name]] += float(value)
    return sums


def parse_decisions(text: str) -> dict[str, float]:
    """model_gateway_route_decisions_total by `reason`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(DECISIONS + "{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(value)
    return out


async def scrape(s: aiohttp.ClientSession, url: str) -> str:
    async with s.get(url + "/metrics") as r:
        r.raise_for_status()
        return await r.text()


async def gateway_cpu(s: aiohttp.ClientSession, url: str) -> float:
    """CPU seconds the gateway process has used."""
    return parse_metrics(await scrape(s, url), ["process_cpu_seconds"])["process_cpu_seconds"]


async def vllm_counters(s: aiohttp.ClientSession, urls: list[str]) -> list[dict[str, float]]:
    texts = await asyncio.gather(*(scrape(s, u) for u in urls))
    return [parse_metrics(t, VLLM_COUNTERS) for t in texts]


async def reset_caches(s: aiohttp.ClientSession, urls: list[str]) -> bool:
    """Empty every server's prefix cache once it is idle; False if one refused."""
    for _ in range(20):
        texts = await asyncio.gather(*(scrape(s, u) for u in urls))
        busy = [parse_metrics(t, ["vllm:num_requests_running", "vllm:num_requests_waiting"])
                for t in texts]  # fmt: skip
        if all(sum(b.values()) == 0 for b in busy):
            break
        await asyncio.sleep(0.25)
    ok = True
    for url in urls:
        for _ in range(40):
            async with s.post(url + "/reset_prefix_cache") as r:
                if r.status == 200 and (await r.json()).get("success", True):
                    break
            await asyncio.sleep(0.25)
        else:
            ok = False
    return ok


# --- a segment ---------------------------------------------------------------------------


@dataclass
class Segment:
    round: int
    workload: str
    policy: str
    started: str
    requests: int = 0
    errors: int = 0
    error_sample: str = ""
    ttft_p50_ms: float = math.nan
    ttft_p90_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    latency_p50_ms: float = math.nan
    output_tok_s: float = 0.0
    requests_s: float = 0.0
    # vLLM's prefix_cache_hits / prefix_cache_queries (tokens, all servers): counted at each
    # lookup, and vLLM looks a waiting request up again at every step until it is scheduled
    hit_rate: float = math.nan
    # vLLM's prompt_tokens_cached / prompt_tokens: counted once per request
    cached_share: float = math.nan
    hit_rate_per_server: list[float] = field(default_factory=list)
    requests_per_server: list[float] = field(default_factory=list)
    preemptions: float = 0.0
    prompt_tokens: float = 0.0
    decisions: dict[str, float] = field(default_factory=dict)
    gateway_cpu: float = 0.0  # cores, from the window's start to the last request's end
    reset_ok: bool = True
    wall_s: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def segment(
    args: argparse.Namespace,
    pool: ProcessPoolExecutor,
    round_: int,
    workload: str,
    policy: str,
    prefixes: list[str],
) -> Segment:
    gateway = args.gateways[policy]
    seg = Segment(round_, workload, policy, time.strftime("%H:%M:%S"))
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        seg.reset_ok = await reset_caches(s, args.vllm)
        decisions_before = parse_decisions(await scrape(s, gateway))
        start_at = time.time() + 0.3
        loop = asyncio.get_running_loop()
        n, p = args.concurrency, args.processes
        shares = [
            Share(gateway, args.model, workload, f"{args.seed}:{round_}:{workload}",
                  range(i * n // p, (i + 1) * n // p), prefixes, args.prefix_tokens,
                  args.suffix_tokens, args.max_tokens, start_at, args.duration_s)
            for i in range(p)
        ]  # fmt: skip
        futures = [loop.run_in_executor(pool, run_share, share) for share in shares]
        # The measured window opens after the warm-up: vLLM's counters from then on.
        await asyncio.sleep(max(0.0, start_at + args.warmup_s - time.time()))
        before = await vllm_counters(s, args.vllm)
        cpu_before, cpu_t0 = await gateway_cpu(s, gateway), time.perf_counter()
        records = [r for part in await asyncio.gather(*futures) for r in part]
        cpu = await gateway_cpu(s, gateway) - cpu_before
        seg.gateway_cpu = round(cpu / (time.perf_counter() - cpu_t0), 2)
        await asyncio.sleep(1.0)  # vLLM publishes its counters with its outputs
        after = await vllm_counters(s, args.vllm)
        seg.decisions = {
            k: v - decisions_before.get(k, 0.0)
            for k, v in parse_decisions(await scrape(s, gateway)).items()
            if v - decisions_before.get(k, 0.0)
        }
    seg.wall_s = round(time.perf_counter() - t0, 2)
    summarize(seg, records, before, after, args.warmup_s, args.duration_s)
    return seg


def summarize(
    seg: Segment,
    records: list[Record],
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    warmup_s: float,
    duration_s: float,
) -> None:
    measured = [r for r in records if r[0] >= warmup_s]
    ok = [r for r in measured if not r[5]]
    failed = [r for r in records if r[5]]
    seg.requests, seg.errors = len(measured), len(failed)
    seg.error_sample = failed[0][5] if failed else ""
    ttfts = [r[1] * 1000 for r in ok]
    seg.ttft_p50_ms = round(pct(ttfts, 0.5), 1)
    seg.ttft_p90_ms = round(pct(ttfts, 0.9), 1)
    seg.ttft_p99_ms = round(pct(ttfts, 0.99), 1)
    seg.latency_p50_ms = round(pct([(r[2] - r[0]) * 1000 for r in ok], 0.5), 1)
    window = duration_s - warmup_s
    ended = [r for r in records if not r[5] and warmup_s <= r[2] <= duration_s]
    seg.output_tok_s = round(sum(r[3] for r in ended) / window, 1)
    seg.requests_s = round(len(ended) / window, 2)
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    hits, queries = sum(d[HITS] for d in delta), sum(d[QUERIES] for d in delta)
    seg.hit_rate = round(hits / queries, 4) if queries else math.nan
    seg.hit_rate_per_server = [
        round(d[HITS] / d[QUERIES], 4) if d[QUERIES] else math.nan for d in delta
    ]
    seg.requests_per_server = [d["vllm:request_success"] for d in delta]
    seg.preemptions = sum(d["vllm:num_preemptions"] for d in delta)
    seg.prompt_tokens = sum(d["vllm:prompt_tokens"] for d in delta)
    cached = sum(d["vllm:prompt_tokens_cached"] for d in delta)
    seg.cached_share = round(cached / seg.prompt_tokens, 4) if seg.prompt_tokens else math.nan


# --- the run -----------------------------------------------------------------------------


def rotated(items: tuple[str, ...] | list[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def table(segments: list[Segment], policies: list[str], workloads: list[str]) -> str:
    def fmt(v: float, digits: int = 0) -> str:
        return "-" if math.isnan(v) else f"{v:,.{digits}f}"

    def percent(v: float) -> str:
        return "-" if math.isnan(v) else f"{100 * v:.1f}%"

    def cells(w: str, p: str) -> list[Segment]:
        return sorted((s for s in segments if s.workload == w and s.policy == p),
                      key=lambda s: s.round)  # fmt: skip

    rounds = sorted({s.round for s in segments})
    lines = [
        f"Medians over {len(rounds)} rounds (per round in brackets). Hit rate: vLLM's "
        "`prefix_cache_hits / prefix_cache_queries`; cached: `prompt_tokens_cached / "
        "prompt_tokens` (once per request).",
        "",
        "| workload | policy | TTFT p50 | TTFT p90 | output tok/s | prefix-cache hit rate "
        "| cached | p90: least_outstanding's / this | tok/s: this / least_outstanding's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in workloads:
        med: dict[str, dict[str, float]] = {}
        for p in policies:
            cell = cells(w, p)
            med[p] = {
                "p50": median([s.ttft_p50_ms for s in cell]),
                "p90": median([s.ttft_p90_ms for s in cell]),
                "tok": median([s.output_tok_s for s in cell]),
                "hit": median([s.hit_rate for s in cell]),
                "cached": median([s.cached_share for s in cell]),
            }
        base = med.get("least_outstanding")
        for p in policies:
            cell, m = cells(w, p), med[p]
            p90s = ", ".join(fmt(s.ttft_p90_ms) for s in cell)
            toks = ", ".join(fmt(s.output_tok_s) for s in cell)
            hits = ", ".join(percent(s.hit_rate) for s in cell)
            vs_p90 = vs_tok = ""
            if base is not None and p != "least_outstanding":
                vs_p90 = f"{base['p90'] / m['p90']:.2f}" if m["p90"] else ""
                vs_tok = f"{m['tok'] / base['tok']:.2f}" if base["tok"] else ""
            lines.append(
                f"| {w} | `{p}` | {fmt(m['p50'])} ms | {fmt(m['p90'])} ms ({p90s}) "
                f"| {fmt(m['tok'])} ({toks}) | {percent(m['hit'])} ({hits}) "
                f"| {percent(m['cached'])} | {vs_p90} | {vs_tok} |"
            )
    lines += [
        "",
        "Summed over rounds: requests measured, errors, vLLM preemptions, each server's share "
        "of the requests, the gateway's routing decisions (`model_gateway_route_decisions_total`"
        " by reason); the gateway process's CPU.",
        "",
        "| workload | policy | requests | errors | preemptions | requests per server "
        "| decisions | gateway CPU (cores, median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in workloads:
        for p in policies:
            cell = cells(w, p)
            servers = [sum(col) for col in zip(*(s.requests_per_server for s in cell), strict=True)]
            split = " / ".join(f"{100 * n / (sum(servers) or 1):.0f}%" for n in servers)
            decisions: dict[str, float] = {}
            for s in cell:
                for k, v in s.decisions.items():
                    decisions[k] = decisions.get(k, 0.0) + v
            said = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(decisions.items()))
            lines.append(
                f"| {w} | `{p}` | {sum(s.requests for s in cell):,} "
                f"| {sum(s.errors for s in cell)} | {sum(s.preemptions for s in cell):,.0f} "
                f"| {split} | {said} | {fmt(median([s.gateway_cpu for s in cell]), 2)} |"
            )
    return "\n".join(lines)


def tenant_prefixes(seed: str, tenants: int, tokens: int) -> list[str]:
    return [words(random.Random(f"{seed}:prefix:{t}"), tokens) for t in range(tenants)]


async def run(args: argparse.Namespace) -> None:
    policies = [p for p in POLICIES if p in args.gateways]
    workloads = args.workloads.split(",")
    jsonl = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    segments: list[Segment] = []

    def emit(record: dict[str, Any]) -> None:
        if jsonl is not None:
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
        if record["kind"] in ("segment", "warmup"):
            said = ", ".join(f"{k} {v:.0f}" for k, v in sorted(record["decisions"].items()))
            print(
                f"{record['kind']} round {record['round']} {record['workload']} "
                f"{record['policy']}: TTFT p50 {record['ttft_p50_ms']} ms p90 "
                f"{record['ttft_p90_ms']} ms, {record['output_tok_s']} tok/s, hit rate "
                f"{record['hit_rate']}, cached {record['cached_share']}, per server "
                f"{record['requests_per_server']}, {record['errors']} errors "
                f"{record['error_sample']}, {record['preemptions']:.0f} preemptions, "
                f"{said}, gateway {record['gateway_cpu']} cores, {record['wall_s']} s",
                flush=True,
            )
        else:
            print(json.dumps(record), flush=True)

    emit({"kind": "config", **{k: v for k, v in vars(args).items() if k != "func"}})
    spawn = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with ProcessPoolExecutor(args.processes, mp_context=spawn) as pool:
        pool.submit(time.sleep, 0).result()  # the client processes start (all at the first call)
        # Warm-up: connections, and vLLM's first requests of these lengths.
        prefixes = tenant_prefixes(f"{args.seed}:warmup", args.tenants, args.prefix_tokens)
        for policy in policies:
            warm = argparse.Namespace(**{**vars(args), "duration_s": args.warmup_run_s,
                                         "warmup_s": 0.0})  # fmt: skip
            seg = await segment(warm, pool, -1, "shared", policy, prefixes)
            emit({"kind": "warmup", **asdict(seg)})
        slowest = 0.0
        for round_ in range(args.rounds):
            left = args.deadline - time.time() if args.deadline else math.inf
            needed = slowest * len(policies) * len(workloads)
            if round_ and needed > left:
                emit({"kind": "note", "text": f"round {round_} skipped: {left:.0f} s left, "
                                              f"{needed:.0f} s needed"})  # fmt: skip
                break
            prefixes = tenant_prefixes(f"{args.seed}:{round_}", args.tenants, args.prefix_tokens)
            for workload in workloads:
                for policy in rotated(policies, round_):
                    seg = await segment(args, pool, round_, workload, policy, prefixes)
                    slowest = max(slowest, seg.wall_s)
                    segments.append(seg)
                    emit({"kind": "segment", **asdict(seg)})
    md = table(segments, policies, workloads)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if jsonl is not None:
        jsonl.close()


# --- a CPU stand-in for vLLM -------------------------------------------------------------


def stub(args: argparse.Namespace) -> None:
    from aiohttp import web

    block = 16
    cache: OrderedDict[int, None] = OrderedDict()  # block hash -> (LRU)
    counters = dict.fromkeys(VLLM_COUNTERS, 0.0)
    state = {"running": 0}
    gpu = asyncio.Lock()  # one prefill at a time: the GPU

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = body["prompt"].split()
        hashes, h = [], 0
        for i in range(0, len(tokens) - len(tokens) % block, block):
            h = hash((h, *tokens[i : i + block]))
            hashes.append(h)
        hit = 0
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            hit += 1
        counters[QUERIES] += len(tokens)
        counters[HITS] += hit * block
        counters["vllm:prompt_tokens"] += len(tokens)
        counters["vllm:prompt_tokens_cached"] += hit * block
        state["running"] += 1
        try:
            async with gpu:
                await asyncio.sleep((len(tokens) - hit * block) * args.prefill_us_per_token / 1e6)
            for h in hashes:
                cache[h] = None
                cache.move_to_end(h)
            while len(cache) > args.blocks:
                cache.popitem(last=False)
            n = int(body.get("max_tokens") or 16)
            usage = {"prompt_tokens": len(tokens), "completion_tokens": n,
                     "total_tokens": len(tokens) + n}  # fmt: skip
            counters["vllm:generation_tokens"] += n
            counters["vllm:request_success"] += 1
            if not body.get("stream"):
                text = "".join(f" w{i + 3}" for i in range(n))
                choice = {"index": 0, "text": text, "finish_reason": "length"}
                return web.json_response({"id": "c", "object": "text_completion",
                                          "model": body["model"], "choices": [choice],
                                          "usage": usage})  # fmt: skip
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await reply.prepare(request)
            for i in range(n):
                chunk = {"id": "c", "object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "text": f" w{i + 3}", "finish_reason":
                                      "length" if i == n - 1 else None}]}  # fmt: skip
                await reply.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(args.token_ms / 1000)
            last = {"id": "c", "object": "text_completion", "model": body["model"],
                    "choices": [], "usage": usage}  # fmt: skip
            await reply.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
            return reply
        finally:
            state["running"] -= 1

    async def metrics(_: web.Request) -> web.Response:
        lines = [f'{k}_total{{engine="0"}} {v}' for k, v in counters.items()]
        lines.append(f'vllm:num_requests_running{{engine="0"}} {state["running"]}')
        lines.append('vllm:num_requests_waiting{engine="0"} 0')
        return web.Response(text="\n".join(lines) + "\n")

    async def reset(_: web.Request) -> web.Response:
        if state["running"]:
            return web.json_response({"success": False})
        cache.clear()
        return web.json_response({"success": True})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.add_routes([
        web.post("/v1/completions", completions), web.get("/metrics", metrics),
        web.post("/reset_prefix_cache", reset), web.get("/health", health),
    ])  # fmt: skip
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


def gateway_arg(text: str) -> tuple[str, str]:
    policy, _, url = text.partition("=")
    if policy not in POLICIES or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"POLICY=URL with POLICY one of {POLICIES}: {text!r}")
    return policy, url.rstrip("/")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(required=True)
    r = sub.add_parser("run", help="the bench")
    r.add_argument("--gateway", type=gateway_arg, action="append", required=True,
                   metavar="POLICY=URL", help="a gateway routing by POLICY")  # fmt: skip
    r.add_argument("--vllm", action="append", required=True, help="a vLLM server's base URL")
    r.add_argument("--model", required=True)
    r.add_argument("--workloads", default=",".join(WORKLOADS))
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--duration-s", type=float, default=15.0)
    r.add_argument("--warmup-s", type=float, default=3.0)
    r.add_argument("--warmup-run-s", type=float, default=4.0, help="per gateway, before round 0")
    r.add_argument("--concurrency", type=int, default=64)
    r.add_argument("--processes", type=int, default=2)
    r.add_argument("--tenants", type=int, default=16)
    r.add_argument("--prefix-tokens", type=int, default=2048)
    r.add_argument("--suffix-tokens", type=int, default=32)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--seed", default="0")
    r.add_argument("--deadline", type=float, default=0.0,
                   help="epoch seconds: start no round that would end later")  # fmt: skip
    r.add_argument("--jsonl")
    r.add_argument("--markdown")
    r.set_defaults(func=lambda a: asyncio.run(run(a)))
    st = sub.add_parser("stub", help="a CPU stand-in for a vLLM server")
    st.add_argument("--port", type=int, required=True)
    st.add_argument("--blocks", type=int, default=1600)
    st.add_argument("--prefill-us-per-token", type=float, default=5.0)
    st.add_argument("--token-ms", type=float, default=5.0)
    st.set_defaults(func=stub)
    args = p.parse_args()
    if hasattr(args, "gateway"):
        args.gateways = dict(args.gateway)
        del args.gateway
        if args.workloads and set(args.workloads.split(",")) - set(WORKLOADS):
            sys.exit(f"--workloads: a comma-separated subset of {WORKLOADS}")
    args.func(args)


if __name__ == "__main__":
    main()
