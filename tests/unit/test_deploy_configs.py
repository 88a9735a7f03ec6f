"""The example configs under deploy/config pass the same validation as at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import CONFIG_ENV, Settings

CONFIGS = sorted((Path(__file__).parents[2] / "deploy" / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(path))
    settings = Settings()
    assert settings.all_variants()


def test_there_are_examples_for_both_roles() -> None:
    assert {p.name for p in CONFIGS} >= {"gateway.yaml", "worker.yaml", "experiment.yaml"}
