"""Engine settings: compute type x thread layout, CTranslate2 alone, interleaved rounds.

This is how the serving defaults (compute_type, inter_threads, intra_threads) were chosen.
A layout `inter x intra` runs `inter` batches at once with `intra` threads each; a batch of
N sequences is split evenly across the `inter` slots, as the DynamicBatcher does.

Run: `python bench/bench_engine.py` (converts a float32 copy of the default model once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from app.backends.ctranslate2.kernels import choose_cpu_kernels

choose_cpu_kernels()  # before CTranslate2 loads: it reads the choice once
import ctranslate2  # noqa: E402

ROOT = Path(__file__).parent.parent
MODEL = "smollm2-135m-instruct"
PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n"
PROMPT += "<|im_start|>assistant\n"
LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (inter_threads, intra_threads)


def float32_copy(models: Path) -> Path:
    out = models / f"{MODEL}-float32"
    if not (out / "model.bin").is_file():
        from app.convert.prepare import convert

        convert(models / ".cache" / f"{MODEL}-hf", out, "float32")
    return out


def run(generator: Any, inter: int, tokens: list[str], batch: int, new_tokens: int) -> float:
    parts = [batch // inter + (1 if i < batch % inter else 0) for i in range(inter)]
    parts = [p for p in parts if p]

    def generate(size: int) -> int:
        results = generator.generate_batch(
            [tokens] * size,
            max_length=new_tokens,
            min_length=new_tokens,
            end_token=[],
            include_prompt_in_result=False,
        )
        return sum(len(r.sequences_ids[0]) for r in results)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(parts)) as pool:
        generated = sum(pool.map(generate, parts))
    return generated / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args()

    dirs = {"int8": args.models / MODEL, "float32": float32_copy(args.models)}
    tokenizer = Tokenizer.from_file(str(dirs["int8"] / "tokenizer.json"))
    tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode(PROMPT).ids]
    engines = {
        (ct, inter, intra): ctranslate2.Generator(
            str(path), compute_type=ct, inter_threads=inter, intra_threads=intra
        )
        for ct, path in dirs.items()
        for inter, intra in LAYOUTS
    }
    for key, generator in engines.items():  # warm-up
        run(generator, key[1], tokens, 2, 8)
    results: dict[tuple[Any, ...], list[float]] = {}
    for batch in args.batch:
        for _ in range(args.rounds):
            for (ct, inter, intra), generator in engines.items():
                rate = run(generator, inter, tokens, batch, args.new_tokens)
                results.setdefault((batch, ct, inter, intra), []).append(rate)
                print(f"batch {batch} {ct} {inter}x{intra}: {rate:.1f} tok/s", flush=True)
    print("| batch | compute type | inter x intra | tok/s (median) | runs |")
    print("| --- | --- | --- | --- | --- |")
    for (batch, ct, inter, intra), rates in results.items():
        runs = ", ".join(f"{r:.0f}" for r in rates)
        print(f"| {batch} | {ct} | {inter}x{intra} | {statistics.median(rates):.1f} | {runs} |")


if __name__ == "__main__":
    main()
