from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.backends.ctranslate2.kernels import choose_cpu_kernels

TESTS = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    # As `model-gateway serve` does, before anything loads CTranslate2 (the tiny model's
    # conversion does): the library reads its kernel choice once.
    choose_cpu_kernels()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test tiers are folders: mark each test by the folder it lives in."""
    for item in items:
        tier = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if tier in {"unit", "integration", "e2e", "fuzz"}:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_ct2_model

    return build_ct2_model(tmp_path_factory.mktemp("tiny-model"))


AppFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
# An app's shutdown (engine threads, Redis clients) on a loaded 2-vCPU CI machine once took
# longer than asgi-lifespan's 5 s default.
SHUTDOWN_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def make_client(tiny_model_dir: Path) -> AppFactory:
    """An httpx client on a fresh app serving the tiny model as variant "tiny"."""
    from app.main import create_app
    from app.settings import Settings, VariantSettings

    @asynccontextmanager
    async def factory(
        variant: dict[str, Any] | None = None, **settings: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        options: dict[str, Any] = {"name": "tiny", "model_path": tiny_model_dir}
        options.update(variant or {})
        settings.setdefault("auth", "off")
        app = create_app(Settings(variants=[VariantSettings(**options)], **settings))
        async with (
            LifespanManager(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
            ) as client,
        ):
            yield client

    return factory
