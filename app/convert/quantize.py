"""`model-gateway quantize`: from one HF checkpoint, the variants a user would try, each in a
folder of its own under the output folder:

- `ct2-<type>`: CTranslate2 models for our workers (`model_path`). float32, int8 and
  int8_float32 load on any CPU; float16, bfloat16, int8_float16 and int8_bfloat16 need CUDA.
- `vllm-<scheme>`: checkpoints vLLM serves (`vllm serve DIR`), made by llmcompressor
  (the `quantize` extra): fp8-dynamic (no calibration), w8a8-int8 (SmoothQuant + GPTQ),
  w4a16-gptq, w4a16-awq, 2of4-sparse (SparseGPT, weights kept in their type).

Each variant is a stage with its own progress bar. A stage writes into `<folder>.partial`
and renames it when whole, so a failed stage leaves nothing `serve` could pick up; the
others go on, and the command fails at the end naming each failed stage and why.

Calibration text comes with Python itself (the standard library's docstrings: English prose
about software), so nothing is downloaded.
"""

from __future__ import annotations

import ast
import logging
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.convert.prepare import ModelPreparationError, convert

logger = logging.getLogger(__name__)

CT2_CPU = ("float32", "int8", "int8_float32")
CT2_CUDA = ("float16", "bfloat16", "int8_float16", "int8_bfloat16")
VLLM_SCHEMES = ("fp8-dynamic", "w8a8-int8", "w4a16-gptq", "w4a16-awq", "2of4-sparse")
CALIBRATION_SAMPLES = 64
CALIBRATION_TOKENS = 256


@dataclass(frozen=True)
class Stage:
    name: str  # the output folder's name
    run: Callable[[Path, Path], None]  # (source checkpoint, partial output folder)


@dataclass(frozen=True)
class Failure:
    stage: str
    why: str


def stages(ctranslate2: list[str] | None, vllm: list[str]) -> list[Stage]:
    """The stages for these CTranslate2 types (None: those this machine can load) and
    llmcompressor schemes."""
    if ctranslate2 is None:
        import ctranslate2 as ct2

        ctranslate2 = list(CT2_CPU + (CT2_CUDA if ct2.get_cuda_device_count() > 0 else ()))
    unknown = [t for t in ctranslate2 if t not in CT2_CPU + CT2_CUDA]
    unknown += [s for s in vllm if s not in VLLM_SCHEMES]
    if unknown:
        raise ModelPreparationError(
            f"unknown variant(s) {', '.join(unknown)}: CTranslate2 types are "
            f"{', '.join(CT2_CPU + CT2_CUDA)}; llmcompressor schemes {', '.join(VLLM_SCHEMES)}"
        )
    found = [Stage(f"ct2-{t}", _ctranslate2(t)) for t in ctranslate2]
    return found + [Stage(f"vllm-{s}", _llmcompressor(s)) for s in vllm]


def quantize(src: Path, out: Path, chosen: list[Stage]) -> list[Failure]:
    """Every stage in turn; the failures, each with its reason."""
    if not (src / "config.json").is_file():
        raise ModelPreparationError(f"{src} is not an HF checkpoint directory (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for stage in chosen:
        partial = out / f"{stage.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            stage.run(src, partial)
        except Exception as exc:  # any stage's failure is reported, and the next one runs
            shutil.rmtree(partial, ignore_errors=True)
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.error("stage %s failed: %s", stage.name, why)
            failures.append(Failure(stage.name, why))
            continue
        final = out / stage.name
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        logger.info("stage %s: written to %s", stage.name, final)
    return failures


@contextmanager
def _bar(stage: str, steps: int) -> Iterator[Callable[[str], None]]:
    """A progress bar for one stage; the callable moves it one step, naming the next."""
    from tqdm import tqdm

    with tqdm(total=steps, desc=stage, unit="step", file=sys.stderr) as bar:

        def step(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update(1)

        yield step


def _ctranslate2(compute_type: str) -> Callable[[Path, Path], None]:
    def run(src: Path, partial: Path) -> None:
        with _bar(f"ct2-{compute_type}", 2) as step:
            # convert() writes and renames its own folder: here, inside this stage's.
            convert(src, partial, compute_type)
            step("converted")
            import ctranslate2

            device = "cuda" if compute_type in CT2_CUDA else "cpu"
            if device == "cpu" or ctranslate2.get_cuda_device_count() > 0:
                ctranslate2.Generator(str(partial), device=device, compute_type=compute_type)
            step("loaded back")

    return run


def calibration_texts(count: int = CALIBRATION_SAMPLES) -> list[str]:
    """`count` paragraphs of English prose: the longer docstrings of the standard library's
    modules, read from their source (nothing imported), the same on every machine with this
    Python."""
    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-z]*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = (
            n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
        )
        docs = [d for d in (ast.get_docstring(n) or "" for n in nodes) if len(d) >= 400]
        texts.extend(docs[:2])  # a few from each module: many subjects
        if len(texts) >= count:
            break
    return texts[:count]


def _llmcompressor(scheme: str) -> Callable[[Path, Path], None]:
    def run(src: Path, partial: Path) -> None:
        raise ModelPreparationError(f"{scheme}: not yet")

    return run


def _modifiers(scheme: str) -> list[Any]:
    raise NotImplementedError
