from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.backends.ctranslate2.model import is_prepared
from tests.live_server import ROOT, live_server

DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not is_prepared(DEFAULT_MODEL):
        pytest.fail("the default model is not prepared: run `make model` (make test does)")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def server(default_model: Path) -> Iterator[str]:
    with live_server() as base_url:
        yield base_url
