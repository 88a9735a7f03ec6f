"""`model-gateway quantize` on the tiny random model: loadable CTranslate2 variants, a progress
bar per stage, a clean failure on a bad input path, and no half-written folder from a stage
that fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.__main__ import main
from app.backends.ctranslate2.model import ModelMetadata, is_prepared
from app.convert.quantize import Stage, quantize
from tests.tiny_model import build_hf_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("quantize") / "hf")


def test_ctranslate2_variants_load_and_each_stage_shows_a_bar(
    tiny_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["quantize", str(tmp_path), "--src", str(tiny_hf), "--ctranslate2", "float32,int8"])
    for compute_type in ("float32", "int8"):
        folder = tmp_path / f"ct2-{compute_type}"
        assert is_prepared(folder)
        assert ModelMetadata.load(folder).quantization == compute_type
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2-float32", "ct2-int8"]
    bars = capsys.readouterr().err
    assert "ct2-float32: 100%" in bars
    assert "ct2-int8: 100%" in bars


# Per scheme: compressed-tensors' format, the weights' bits and type, the activations' type.
VLLM_SCHEMES = {
    "fp8-dynamic": ("float-quantized", 8, "float", "float"),
    "w8a8-int8": ("int-quantized", 8, "int", "int"),
    "w4a16-gptq": ("pack-quantized", 4, "int", None),
    "w4a16-awq": ("pack-quantized", 4, "int", None),
}


def test_llmcompressor_schemes_run_on_cpu_and_load_back(tiny_hf: Path, tmp_path: Path) -> None:
    pytest.importorskip("llmcompressor", reason="the 'quantize' extra is not installed")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    schemes = [*VLLM_SCHEMES, "2of4-sparse"]
    main(["quantize", str(tmp_path), "--src", str(tiny_hf), "--ctranslate2", "",
          "--vllm", ",".join(schemes)])  # fmt: skip
    for scheme, (form, bits, kind, activations) in VLLM_SCHEMES.items():
        raw = json.loads((tmp_path / f"vllm-{scheme}" / "config.json").read_text())
        config = QuantizationConfig.model_validate(raw["quantization_config"])
        assert config.format == form, scheme
        (group,) = config.config_groups.values()
        assert (group.weights.num_bits, group.weights.type) == (bits, kind), scheme
        assert (group.input_activations.type if group.input_activations else None) == activations
        if bits == 4:  # the tiny model's 64-wide layers take groups of 64, not vLLM's 128
            assert group.weights.group_size == 64
    # 2:4 sparsity: at least two of every four weights in a row are zero, stored dense.
    sparse = tmp_path / "vllm-2of4-sparse"
    assert "quantization_config" not in json.loads((sparse / "config.json").read_text())
    weights = load_file(str(sparse / "model.safetensors"))
    projection = weights["model.layers.0.mlp.up_proj.weight"]
    assert bool(((projection.reshape(-1, 4) == 0).sum(dim=1) >= 2).all())


def test_a_bad_input_path_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(tmp_path / "out"), "--src", str(tmp_path / "nothing-here")])
    assert "is not an HF checkpoint directory" in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(tmp_path / "out"), "--src", str(tmp_path), "--vllm", "w3a1"])
    assert "unknown variant(s) w3a1" in str(exit_.value.code)


def test_a_failed_stage_leaves_nothing_and_the_next_runs(tiny_hf: Path, tmp_path: Path) -> None:
    def breaks_halfway(src: Path, partial: Path) -> None:
        partial.mkdir()
        (partial / "model.bin").write_bytes(b"half")
        raise RuntimeError("out of memory\ndetails")

    def works(src: Path, partial: Path) -> None:
        partial.mkdir()

    failures = quantize(tiny_hf, tmp_path, [Stage("broken", breaks_halfway), Stage("ok", works)])
    assert [(f.stage, f.why) for f in failures] == [("broken", "out of memory")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
