"""Serving throughput: the gateway against the engine alone and against itself unbatched.

For each concurrency, the targets run interleaved (A B C A B C ...) and medians are quoted,
since these VMs lose CPU to their neighbours and drift minute to minute.

  direct             CTranslate2 `generate_batch` in this process, best layout of batches
                     and threads for the same number of sequences (reported separately)
  gateway            `model-gateway serve` with default settings, streaming clients
  gateway-unbatched  the same with `max_batch_size=1`
  llama-cpp          optional: an OpenAI-compatible server you started (--llama-cpp-url)

Every request generates exactly --new-tokens tokens (greedy, `ignore_eos`), so tokens/s
compare like for like. Run: `make bench` or `python bench/bench_serving.py --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

from app.backends.ctranslate2.kernels import choose_cpu_kernels

choose_cpu_kernels()  # before CTranslate2 loads: it reads the choice once
import ctranslate2  # noqa: E402

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import live_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it moves, in simple words.",
    "Describe a busy market in a coastal town early in the morning.",
    "List some tips for someone learning to cook at home for the first time.",
    "Tell me about the history of paper and how it changed the world.",
    "What should a traveller pack for a week of hiking in the mountains?",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Write a letter from a cat to its owner about the new dog in the house.",
]


@dataclass
class Run:
    target: str
    concurrency: int
    tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    layout: str = ""

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


class Direct:
    """The engine alone: the same prompts, token budget and end tokens as the gateway."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._single = ctranslate2.Generator(
            str(model_dir), compute_type="int8", inter_threads=1, intra_threads=1
        )
        self._double = ctranslate2.Generator(
            str(model_dir), compute_type="int8", inter_threads=2, intra_threads=1
        )
        self._pool = ThreadPoolExecutor(2)

    def _tokens(self, count: int) -> list[list[str]]:
        batch = []
        for i in range(count):
            ids = self._tokenizer.encode(chat_prompt(PROMPTS[i % len(PROMPTS)])).ids
            batch.append([self._tokenizer.id_to_token(t) for t in ids])
        return batch

    def _generate(
        self,
        generator: Any,
        batch: list[list[str]],
        new_tokens: int,
        started: float,
        first: dict[int, float],
        offset: int,
    ) -> int:
        lock = threading.Lock()

        def on_step(step: Any) -> bool:
            with lock:
                first.setdefault(offset + step.batch_id, time.perf_counter() - started)
            return False

        results = generator.generate_batch(
            batch,
            max_length=new_tokens,
            min_length=new_tokens,
            end_token=[],
            include_prompt_in_result=False,
            callback=on_step,
        )
        return sum(len(r.sequences_ids[0]) for r in results)

    def run(self, concurrency: int, new_tokens: int) -> list[Run]:
        batch = self._tokens(concurrency)
        runs = []
        layouts: list[tuple[str, Any, list[list[list[str]]]]] = [
            (f"1x{concurrency} (1 thread)", self._single, [batch])
        ]
        if concurrency > 1:
            half = (concurrency + 1) // 2
            layouts.append(
                (
                    f"2x{half} (2 batches at once, 1 thread each)",
                    self._double,
                    [batch[:half], batch[half:]],
                )
            )
        for name, generator, parts in layouts:
            first: dict[int, float] = {}
            started = time.perf_counter()
            futures, offset = [], 0
            for part in parts:
                futures.append(
                    self._pool.submit(
                        self._generate, generator, part, new_tokens, started, first, offset
                    )
                )
                offset += len(part)
            tokens = sum(f.result() for f in futures)
            wall = time.perf_counter() - started
            runs.append(Run("direct", concurrency, tokens, wall, list(first.values()), name))
        return runs


async def run_clients(
    base_url: str, target: str, concurrency: int, new_tokens: int, requests_per_client: int
) -> Run:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def one_client(index: int) -> tuple[int, list[float]]:
            tokens, ttfts = 0, []
            for r in range(requests_per_client):
                body = {
                    "model": MODEL,
                    "prompt": chat_prompt(PROMPTS[(index + r) % len(PROMPTS)]),
                    "max_tokens": new_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                sent = time.perf_counter()
                first_at, chunks, usage = None, 0, None
                # Identical greedy prompts would be answered from the cache or coalesced:
                # measure generation, not the cache.
                headers = {"Cache-Control": "no-cache, no-store"}
                async with client.stream(
                    "POST", "/v1/completions", json=body, headers=headers
                ) as reply:
                    reply.raise_for_status()
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        if first_at is None:
                            first_at = time.perf_counter()
                        chunks += 1
                        if '"usage":{' in line:
                            usage = json.loads(line[6:])["usage"]
                assert first_at is not None
                ttfts.append(first_at - sent)
                tokens += usage["completion_tokens"] if usage else chunks
            return tokens, ttfts

        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return Run(
        target,
        concurrency,
        sum(t for t, _ in results),
        wall,
        [x for _, ttfts in results for x in ttfts],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r.concurrency, r.target, r.layout) for r in runs})
    for concurrency, target, layout in keys:
        group = [
            r for r in runs if (r.concurrency, r.target, r.layout) == (concurrency, target, layout)
        ]
        ttfts = [t for r in group for t in r.ttft_s]
        rows.append(
            {
                "concurrency": concurrency,
                "target": target,
                "layout": layout,
                "tok_per_s_median": statistics.median(r.tok_per_s for r in group),
                "tok_per_s_runs": [round(r.tok_per_s, 1) for r in group],
                "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
                "ttft_p95_ms": 1000 * percentile(ttfts, 0.95),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| clients | target | layout | tok/s (median) | runs | TTFT p50 ms | TTFT p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['target']} | {r['layout']} | "
            f"{r['tok_per_s_median']:.1f} | {r['tok_per_s_runs']} | "
            f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} |"
        )
    for c in sorted({r["concurrency"] for r in rows}):
        at = {
            (r["target"], r["layout"]): r["tok_per_s_median"] for r in rows if r["concurrency"] == c
        }
        best_direct = max(v for (t, _), v in at.items() if t == "direct")
        gateway = at.get(("gateway", ""))
        unbatched = at.get(("gateway-unbatched", ""))
        llama = at.get(("llama-cpp", ""))
        line = f"{c} clients: gateway/best-direct = {gateway / best_direct:.2f}" if gateway else ""
        if gateway and unbatched:
            line += f", gateway/unbatched = {gateway / unbatched:.2f}"
        if gateway and llama:
            line += f", gateway/llama-cpp = {gateway / llama:.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / MODEL)
    parser.add_argument("--llama-cpp-url", help="base URL of a running llama-cpp-python server")
    parser.add_argument("--skip", nargs="*", default=[], help="targets to leave out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()

    variant = {"name": MODEL, "model_path": str(args.model_dir)}
    unbatched = {**variant, "batching": {"max_batch_size": 1}}
    direct = Direct(args.model_dir)
    runs: list[Run] = []
    with live_server([variant]) as gateway_url, live_server([unbatched]) as unbatched_url:
        targets: dict[str, Callable[[int], list[Run]]] = {
            "direct": lambda c: direct.run(c, args.new_tokens),
        }
        for name, url in (
            ("gateway", gateway_url),
            ("gateway-unbatched", unbatched_url),
            ("llama-cpp", args.llama_cpp_url),
        ):
            if url:
                targets[name] = lambda c, url=url, name=name: [
                    asyncio.run(run_clients(url, name, c, args.new_tokens, 3 if c == 1 else 1))
                ]
        for name in args.skip:
            targets.pop(name, None)
        # Warm up every target once (first requests pay for allocations and caches).
        for run_target in targets.values():
            run_target(2)
        for concurrency in args.concurrency:
            for round_index in range(args.rounds):
                for name, run_target in targets.items():
                    for run in run_target(concurrency):
                        runs.append(run)
                        print(
                            f"round {round_index + 1} c={concurrency} {name} {run.layout}: "
                            f"{run.tok_per_s:.1f} tok/s",
                            flush=True,
                        )
    rows = summarize(runs)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": __import__("os").cpu_count(),
        "platform": platform.platform(),
        "ctranslate2": ctranslate2.__version__,
    }
    args.out.write_text(
        json.dumps({"machine": machine, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
