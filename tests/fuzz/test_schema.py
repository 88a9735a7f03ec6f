"""Schema fuzzing: schemathesis draws requests from our own `/openapi.json` and sends them to a
live server (the tiny model; an admin token set; API keys optional, so that the key routes
work), for every generation and admin route, the admin routes with and without the token.
No reply may be a server error, and every reply must be what the schema declares for that
route: a declared status, content type, headers and body. Token counts are kept small (the
hostile values have the catalogue tests in tests/integration/test_bad_input.py) and most
bodies name the served model, so that many cases really generate."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import live_server

TOKEN = "fuzz-admin-token"
MODEL = "tiny"
# Cases per operation: 6 generation and 10 admin operations make over 5,000.
EXAMPLES = 520
ADMIN_EXAMPLES = 200
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream",
                    "/", "/invocations")  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    variants = [{"name": MODEL, "model_path": str(tiny_model_dir)}]
    # Keys optional: generation calls need none, and the admin API's key routes work.
    key = {"name": "fuzz", "sha256": "0" * 64}
    with live_server(variants, admin_token=TOKEN, auth="optional",
                     keys=json.dumps([key])) as url:  # fmt: skip
        yield url


def operations(server: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(server + "/openapi.json").include(
        path_regex="^(/v1/completions|/v1/chat/completions|/generate|/generate_stream|/"
        "|/invocations|/admin/.*)$"
    )
    return [result.ok() for result in schema.get_all_operations()]


def _small(value: Any) -> Any:
    return min(value, 8) if isinstance(value, int) and not isinstance(value, bool) else value


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    if not isinstance(body, dict) or context.operation.path not in GENERATION_PATHS:
        return body
    if context.operation.path.startswith("/v1/") and isinstance(body.get("model"), str):
        body["model"] = MODEL
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body:
            body[name] = _small(body[name])
    if isinstance(body.get("parameters"), dict) and "max_new_tokens" in body["parameters"]:
        body["parameters"]["max_new_tokens"] = _small(body["parameters"]["max_new_tokens"])
    return body


def test_every_reply_is_as_declared(server: str) -> None:
    ops = operations(server)
    assert len(ops) == 16, [op.label for op in ops]  # 6 generation, 10 admin
    statuses: dict[str, Counter[int]] = {op.label: Counter() for op in ops}
    for operation in ops:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=ADMIN_EXAMPLES if operation.path.startswith("/admin/") else EXAMPLES,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def check(case: Any) -> None:
            headers = [None]
            if case.path.startswith("/admin/"):
                headers.append({"Authorization": f"Bearer {TOKEN}"})
            for extra in headers:
                reply = case.call_and_validate(base_url=server, checks=CHECKS, headers=extra,
                                               timeout=30)  # fmt: skip
                statuses[case.operation.label][reply.status_code] += 1

        check()
    print({label: dict(counts) for label, counts in statuses.items()})
    assert sum(sum(c.values()) for c in statuses.values()) >= 5000
    for label, counts in statuses.items():
        if " /admin/" not in label:
            assert counts[200] >= 10, (label, counts)  # bodies that really generated
