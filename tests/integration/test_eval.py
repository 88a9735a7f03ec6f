"""`model-gateway eval` against two live workers (float32 and int8 of the tiny model): the
report has every column for each, and the reference agrees with itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.__main__ import main
from app.convert.evaluate import COLUMNS
from app.convert.prepare import convert
from tests.live_server import live_server
from tests.tiny_model import build_hf_model


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("eval-models")
    hf = build_hf_model(work / "hf")
    return {q: convert(hf, work / q, q) for q in ("float32", "int8")}


def test_eval_reports_quality_speed_and_cost_per_variant(
    tiny_variants: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_cache = json.dumps({"enabled": False})
    with (
        live_server([{"name": "tiny", "model_path": str(tiny_variants["float32"])}],
                    cache=no_cache) as float32,
        live_server([{"name": "tiny", "model_path": str(tiny_variants["int8"])}],
                    cache=no_cache) as int8,
    ):  # fmt: skip
        targets = [f"{name}={url},model=tiny,path={tiny_variants[name]}"
                   for name, url in (("float32", float32), ("int8", int8))]  # fmt: skip
        main(["eval", *targets, "--out", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:4]}
    assert set(rows) == {"float32 (reference)", "int8"}
    report = {r["target"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    reference, int8_result = report["float32"], report["int8"]
    assert reference["agreement"] == 1.0
    assert reference["similarity"] == 1.0
    for result in report.values():
        assert len(result["replies"]) == 42
        assert 0 <= result["accuracy"] <= 1
        # Scored by CTranslate2 from the model directory: the workers cannot score prompts.
        assert result["perplexity"] > 1
        assert result["perplexity_by"] == "ctranslate2"
        assert result["tokens_per_s_1"] > 0
        assert result["tokens_per_s_32"] > 0
        assert result["ttft_p50_ms"] > 0
        assert result["peak_rss_bytes"] > 0
        assert result["peak_gpu_bytes"] is None  # no GPU here
    assert int8_result["size_bytes"] < reference["size_bytes"] / 2
    assert (tmp_path / "eval.md").read_text().startswith("| variant |")
    assert (tmp_path / "eval.png").stat().st_size > 0
