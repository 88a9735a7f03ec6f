"""The command line: `keys create` prints a secret once and a config entry that holds its
hash, not the secret; `serve` says in its log whether the door is open."""

from __future__ import annotations

import logging
import os

import pytest
import yaml

from app.__main__ import _log_auth, main
from app.settings import KeySettings, Settings
from app.tenancy.keys import hash_secret


def test_keys_create_prints_the_secret_once_and_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["keys", "create", "alice", "--models", "m1,m2", "--rpm", "60", "--priority", "batch"])
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    secret = first.rsplit(" ", 1)[1]
    assert secret.startswith("mg-")
    assert out.count(secret) == 1
    (entry,) = yaml.safe_load(rest.split("\n", 2)[2])["keys"]
    key = KeySettings.model_validate(entry)
    assert key.sha256 == hash_secret(secret)
    assert (key.name, key.models, key.priority) == ("alice", ["m1", "m2"], "batch")
    assert key.limits.requests_per_minute == 60


def test_bad_key_options_exit_with_the_reason() -> None:
    with pytest.raises(SystemExit, match="requests_per_minute"):
        main(["keys", "create", "bob", "--rpm", "0"])


@pytest.mark.parametrize(
    ("host", "auth", "level", "words"),
    [
        ("127.0.0.1", "off", logging.WARNING, "the door is open to anyone on this machine"),
        ("0.0.0.0", "off", logging.WARNING, "AUTH IS OFF"),
        ("::", "off", logging.WARNING, "AUTH IS OFF"),
        ("0.0.0.0", "optional", logging.INFO, "calls without an API key are served"),
    ],
)
def test_serve_says_whether_the_door_is_open(
    host: str, auth: str, level: int, words: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name in [n for n in os.environ if n.startswith("MODEL_GATEWAY_")]:
        monkeypatch.delenv(name)
    with caplog.at_level(logging.INFO):
        _log_auth(Settings(host=host, auth=auth))  # type: ignore[arg-type]
    (record,) = caplog.records
    assert record.levelno == level
    assert words in record.getMessage()
