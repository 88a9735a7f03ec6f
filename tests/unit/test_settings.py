"""Settings: YAML under env under explicit values, and clear errors for bad config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import CONFIG_ENV, Settings, describe_error

YAML = """
port: 9001
request_timeout_s: 30
variants:
  - name: a
    model_path: models/a
    batching: {max_batch_size: 4}
  - name: b
    model_path: models/b
    compute_type: float32
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MODEL_GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MODEL_GATEWAY_AUTH", "off")  # the tests of keys ask for them


def test_defaults_serve_the_default_model() -> None:
    settings = Settings()
    assert settings.port == 8000
    (variant,) = settings.variants
    assert variant.name == "smollm2-135m-instruct"
    assert variant.compute_type == "default"  # as converted: prepare-model makes int8


def test_yaml_file_then_env_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(YAML)
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = Settings()
    assert settings.port == 9001
    assert [v.name for v in settings.variants] == ["a", "b"]
    assert settings.variants[0].batching.max_batch_size == 4
    assert settings.variants[1].compute_type == "float32"
    monkeypatch.setenv("MODEL_GATEWAY_PORT", "9002")
    assert Settings().port == 9002
    assert Settings(port=9003).port == 9003


def test_variants_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_GATEWAY_VARIANTS", '[{"name": "x", "model_path": "m"}]')
    assert [v.name for v in Settings().variants] == ["x"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "repeated: a"),
        ({"variants": []}, "nothing to serve"),
        ({"variants": [{"name": "a", "backend": "onnx"}]}, "backend"),
        ({"variants": [{"name": "bad name!"}]}, "pattern"),
        ({"variants": [{"batching": {"max_batch_size": 0}}]}, "max_batch_size"),
        ({"variants": [{"batching": {"max_wait_ms": -1}}]}, "max_wait_ms"),
        ({"variants": [{"unknown": 1}]}, "unknown"),
        ({"variants": [{"name": "a", "shadow": {"sample_rate": 0.1}}]}, "belongs to"),
        (
            {"experiments": [{"name": "x", "variants": [{}]}], "variants": [{}]},
            "repeated: smollm2",
        ),
        (
            {
                "experiments": [{"name": "e", "variants": [{"name": "e"}]}],
                "variants": [{"name": "e"}],
            },
            "repeated: e",
        ),
        ({"experiments": [{"name": "e", "variants": []}]}, "at least 1"),
        (
            {
                "experiments": [
                    {
                        "name": "e",
                        "variants": [{"name": "a", "weight": 1, "shadow": {"sample_rate": 1}}],
                    }
                ]
            },
            "not a weight",
        ),
        (
            {
                "experiments": [
                    {"name": "e", "variants": [{"name": "a", "shadow": {"sample_rate": 2}}]}
                ]
            },
            "sample_rate",
        ),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"port": 70000}, "port"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)  # type: ignore[arg-type]


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/nonexistent/gateway.yaml")
    with pytest.raises(ValueError, match=r"/nonexistent/gateway\.yaml"):
        Settings()


EXPERIMENTS = """\
port: 8000
experiments:
  - name: chat
    allow_variant_header: true
    variants:
      - name: a
        weight: 90
      - name: b
        weight: 10
      - name: c
        backend: openai
        upstream: {replicas: ["http://worker:8000"]}
        shadow: {sample_rate: 0.25}
"""


def test_experiments_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(EXPERIMENTS)
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = Settings()
    assert settings.variants == []  # an experiment only: no default variant
    (experiment,) = settings.all_experiments()
    assert experiment.allow_variant_header
    assert [(v.name, v.effective_weight) for v in experiment.variants] == [
        ("a", 90), ("b", 10), ("c", 0)
    ]  # fmt: skip
    assert experiment.variants[2].shadow is not None
    assert [v.name for v in settings.all_variants()] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("replace", "by", "line", "message"),
    [
        ("weight: 90", "weight: 0", 3, "all weights are zero"),
        ("        weight: 10", "        shadow: {sample_rate: 0.5}", 3, "shadow needs a primary"),
        ("backend: openai", "backend: onnx", 11, "'ctranslate2' or 'openai'"),
        ("weight: 10", "weight: -1", 9, "greater than or equal to 0"),
        ("sample_rate: 0.25", "sample_rate: 1.5", 13, "less than or equal to 1"),
        ("      - name: b", "      - name: a", None, "repeated: a"),
    ],
)
def test_config_errors_name_the_yaml_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    replace: str,
    by: str,
    line: int | None,
    message: str,
) -> None:
    config = tmp_path / "gateway.yaml"
    text = EXPERIMENTS.replace(replace, by)
    if "shadow needs" in message:
        text = text.replace("weight: 90", "shadow: {sample_rate: 0.1}")
    if "all weights" in message:
        text = text.replace("weight: 10", "weight: 0")
    config.write_text(text)
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with pytest.raises(ValidationError) as caught:
        Settings()
    described = describe_error(caught.value, str(config))
    assert message in described
    if line is not None:
        assert f"{config}, line {line}: " in described


KEY = {"name": "alice", "sha256": "ab" * 32}


def test_auth_is_required_by_default_and_needs_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_GATEWAY_AUTH")
    with pytest.raises(ValidationError, match="auth is required but no keys"):
        Settings()
    assert Settings(keys=[KEY]).auth == "required"  # type: ignore[list-item]
    # With Redis, keys may come from the admin API.
    assert Settings(redis_url="redis://localhost:6379/0").auth == "required"


def test_a_bare_yaml_off_turns_auth_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_GATEWAY_AUTH")
    config = tmp_path / "gateway.yaml"
    config.write_text("auth: off\n")  # YAML 1.1: the boolean false
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert Settings().auth == "off"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([KEY, KEY], "key names must be unique"),
        ([{**KEY, "models": ["nope"]}], "key 'alice': no served model nope"),
        ([{**KEY, "sha256": "secret"}], "String should match pattern"),
        ([{**KEY, "priority": "urgent"}], "Input should be 'interactive', 'standard' or 'batch'"),
        ([{**KEY, "limits": {"requests_per_minute": 0}}], "greater than or equal to 1"),
    ],
)
def test_bad_keys_are_refused(keys: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(keys=keys)  # type: ignore[arg-type]
