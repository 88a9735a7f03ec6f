"""CTranslate2's CPU kernel choice: made by an explicit call before the library loads, the
user's own choice kept, and a library already loaded with another choice refused."""

from __future__ import annotations

import sys

import pytest

from app.backends.ctranslate2 import kernels


@pytest.fixture
def intel(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(kernels, "_intel", lambda: True)
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "ctranslate2", raising=False)
    return monkeypatch


def test_generic_kernels_on_intel_before_the_library_loads(intel: pytest.MonkeyPatch) -> None:
    assert kernels.choose_cpu_kernels() == "GENERIC"
    assert kernels.os.environ[kernels.ISA_ENV] == "GENERIC"


def test_the_users_choice_wins(intel: pytest.MonkeyPatch) -> None:
    intel.setenv(kernels.ISA_ENV, "AVX2")
    assert kernels.choose_cpu_kernels() == "AVX2"


def test_no_choice_elsewhere(intel: pytest.MonkeyPatch) -> None:
    intel.setattr(kernels, "_intel", lambda: False)
    assert kernels.choose_cpu_kernels() is None
    assert kernels.ISA_ENV not in kernels.os.environ


def test_a_library_loaded_with_another_choice_is_refused(intel: pytest.MonkeyPatch) -> None:
    intel.setitem(sys.modules, "ctranslate2", object())
    with pytest.raises(RuntimeError, match="before its CPU kernels were chosen"):
        kernels.choose_cpu_kernels()
    intel.setenv(kernels.ISA_ENV, "GENERIC")  # loaded after the choice: nothing to refuse
    assert kernels.choose_cpu_kernels() == "GENERIC"
