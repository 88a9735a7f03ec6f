"""`model-gateway quantize`: from one HF checkpoint, the variants a user would try, each in a
folder of its own under the output folder:

- `ct2-<type>`: CTranslate2 models for our workers (`model_path`). float32, int8 and
  int8_float32 load on any CPU (int8 and int8_float32 are the same file there; int16 on
  request); float16, bfloat16, int8_float16 and int8_bfloat16 need CUDA.
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
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.backends.ctranslate2.model import QUANTIZATIONS
from app.convert.prepare import ModelPreparationError, convert

logger = logging.getLogger(__name__)

# The default CTranslate2 variants; int16 is there on request (on this project's Intel VM
# its replies were nonsense: BENCHMARKS.md, "Quantized variants").
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
    unknown = [t for t in ctranslate2 if t not in QUANTIZATIONS]
    unknown += [s for s in vllm if s not in VLLM_SCHEMES]
    if unknown:
        raise ModelPreparationError(
            f"unknown variant(s) {', '.join(unknown)}: CTranslate2 types are "
            f"{', '.join(QUANTIZATIONS)}; llmcompressor schemes {', '.join(VLLM_SCHEMES)}"
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
        with _bar(f"vllm-{scheme}", 4) as step:
            try:
                import torch
                from llmcompressor import oneshot
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError as exc:
                raise ModelPreparationError(
                    f"llmcompressor schemes need the 'quantize' extra: pip install -e "
                    f"'.[convert,quantize]' ({exc})"
                ) from exc
            if not torch.cuda.is_available():
                _without_pinned_memory()
            # bfloat16: what vLLM serves the layers left unquantized in.
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
            tokenizer = AutoTokenizer.from_pretrained(src)
            step("loaded")
            recipe, calibrated = _recipe(scheme, _group_size(model))
            options: dict[str, Any] = {}
            if calibrated:
                options = {
                    "dataset": _calibration_dataset(tokenizer),
                    "num_calibration_samples": CALIBRATION_SAMPLES,
                    "max_seq_length": CALIBRATION_TOKENS,
                }
            step("calibration ready" if calibrated else "no calibration")
            oneshot(model=model, recipe=recipe, **options)
            step("compressed")
            with warnings.catch_warnings():
                # llmcompressor leaves the model dispatched to the CPU; saving it is fine.
                warnings.filterwarnings("ignore", "Attempting to save a model with offloaded")
                model.save_pretrained(partial, save_compressed=True)
            tokenizer.save_pretrained(partial)
            step("saved")

    return run


def _without_pinned_memory() -> None:
    """llmcompressor 0.14 pins its cached activations in page-locked memory whether or not
    there is a GPU, which a CPU-only torch refuses ("Cannot access accelerator device"):
    on such a machine the cache keeps them in ordinary memory (AWQ needs it)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def _recipe(scheme: str, group_size: int) -> tuple[list[Any], bool]:
    """llmcompressor's modifiers for `scheme`, and whether they need calibration data. The
    output layer stays in its type, as vLLM expects."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    ignore = ["lm_head"]
    if scheme == "fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)], False
    if scheme == "w8a8-int8":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)], True  # fmt: skip
    if scheme == "2of4-sparse":
        sparse = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"],
                                   ignore=["re:.*lm_head"])  # fmt: skip
        return [sparse], True
    groups = _w4a16_groups(group_size, symmetric=scheme == "w4a16-gptq")
    if scheme == "w4a16-gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore)], True
    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)], True


def _w4a16_groups(group_size: int, *, symmetric: bool) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                               group_size=group_size)  # fmt: skip
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _group_size(model: Any) -> int:
    """The largest of vLLM's 4-bit group sizes (128, 64, 32) that divides every linear layer's
    input: SmolLM2-135M's hidden size, 576, takes 64."""
    import torch

    inputs = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for size in (128, 64, 32):
        if all(n % size == 0 for n in inputs):
            return size
    raise ModelPreparationError(f"no 4-bit group size divides the layer widths {sorted(inputs)}")


def _calibration_dataset(tokenizer: Any) -> Any:
    from datasets import Dataset

    encoded = [tokenizer(text, truncation=True, max_length=CALIBRATION_TOKENS)
               for text in calibration_texts()]  # fmt: skip
    return Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in encoded],
        "attention_mask": [e["attention_mask"] for e in encoded],
    })  # fmt: skip
