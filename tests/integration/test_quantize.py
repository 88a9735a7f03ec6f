"""`model-gateway quantize` on the tiny random model: loadable CTranslate2 variants, a progress
bar per stage, a clean failure on a bad input path, and no half-written folder from a stage
that fails."""

from __future__ import annotations

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
