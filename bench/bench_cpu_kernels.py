"""CTranslate2's CPU kernel choices on this machine: speed and whether the int8 replies are
right. Each setting runs in its own process (CTranslate2 reads them at import), settings
interleaved round by round; greedy, 64 new tokens, one thread.

- default: what CTranslate2 picks by itself (on Intel CPUs: MKL for int8, its AVX2 kernels);
- GENERIC: `CT2_FORCE_CPU_ISA=GENERIC`, what our backend sets on Intel CPUs;
- oneDNN: `CT2_USE_MKL=0`;
- MKL AVX-512: `MKL_ENABLE_INSTRUCTIONS=AVX512` (MKL without its VNNI kernels).

Run: `python bench/bench_cpu_kernels.py` (default model, int8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
MODEL = ROOT / "models" / "smollm2-135m-instruct"
SETTINGS = {
    "default": {},
    "GENERIC": {"CT2_FORCE_CPU_ISA": "GENERIC"},
    "oneDNN": {"CT2_USE_MKL": "0"},
    "MKL AVX-512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
QUESTION = "What is the capital of France?"

# Run in a child process: ctranslate2 imported directly, so that only the environment chooses.
CHILD = """
import json, sys, time, ctranslate2, tokenizers
model = sys.argv[1]
tok = tokenizers.Tokenizer.from_file(model + "/tokenizer.json")
def tokens(text):
    return [tok.id_to_token(i) for i in tok.encode(text).ids]
def turn(role, text):
    return "<|im_start|>" + role + "\\n" + text + "<|im_end|>\\n"
system = turn("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
chat = system + turn("user", sys.argv[2]) + "<|im_start|>assistant\\n"
story = tokens(turn("user", "Tell me a story about a dragon.") + "<|im_start|>assistant\\n")
g = ctranslate2.Generator(model, intra_threads=1, compute_type="int8")
out = {}
r = g.generate_batch([tokens(chat)], max_length=20, sampling_topk=1,
                     include_prompt_in_result=False, end_token="<|im_end|>")
out["reply"] = tok.decode(r[0].sequences_ids[0])
for batch in (1, 8):
    started = time.perf_counter()
    g.generate_batch([story] * batch, max_length=64, sampling_topk=1,
                     include_prompt_in_result=False, end_token=[])
    out[f"batch {batch}"] = batch * 64 / (time.perf_counter() - started)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-path", type=Path, default=MODEL)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            command = [sys.executable, "-c", CHILD, str(args.model_path), QUESTION]
            reply = subprocess.run(command, env={**os.environ, **env}, capture_output=True,
                                   check=True, text=True)  # fmt: skip
            runs[name].append(json.loads(reply.stdout.strip().splitlines()[-1]))
    print(f"| setting | tok/s batch 1 | tok/s batch 8 | int8 reply to {QUESTION!r} |")
    print("| --- | --- | --- | --- |")
    for name, results in runs.items():
        rates = [statistics.median(r[f"batch {b}"] for r in results) for b in (1, 8)]
        print(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} | {results[0]['reply']!r} |")


if __name__ == "__main__":
    main()
