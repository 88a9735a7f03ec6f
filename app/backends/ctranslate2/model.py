"""A prepared CTranslate2 model directory: what serving reads beside the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METADATA_FILE = "model_gateway.json"
# CTranslate2's compute types that a model can be converted to.
QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


@dataclass(frozen=True)
class ModelMetadata:
    """What serving needs to know about a converted model, beside its weights."""

    context_length: int
    end_tokens: tuple[str, ...]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    quantization: str
    source: str

    @classmethod
    def load(cls, model_dir: Path) -> ModelMetadata:
        data = json.loads((model_dir / METADATA_FILE).read_text())
        data["end_tokens"] = tuple(data["end_tokens"])
        return cls(**data)

    def save(self, model_dir: Path) -> None:
        payload = {**self.__dict__, "end_tokens": list(self.end_tokens)}
        (model_dir / METADATA_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / METADATA_FILE).is_file() and (model_dir / "model.bin").is_file()
