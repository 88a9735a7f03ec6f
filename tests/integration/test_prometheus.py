"""The dashboard and alert rules against a real Prometheus scraping a live gateway: every
PromQL expression in the dashboard runs and returns data (those that need a GPU or vLLM:
runs without error), and promtool accepts the configuration and the rules."""

from __future__ import annotations

import json
import runpy
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.tenancy.keys import hash_secret
from tests.live_server import ROOT, free_port, live_server, required_binary, wait_until
from tests.stub_upstream import StubUpstream

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "model-gateway.json"
NEEDS_GPU_OR_VLLM = ("model_gateway_gpu_", "vllm:")


def binary(name: str) -> str:
    return required_binary(name, "apt-get install prometheus")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m").replace("$variant", ".*").replace("$instance", ".*")
    )


@pytest.fixture(scope="module")
def prometheus(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    prometheus_bin = binary("prometheus")
    # "tiny" is an experiment whose every request is copied to a shadow variant.
    experiment = {
        "name": "tiny",
        "variants": [
            {"name": "tiny-a", "model_path": str(tiny_model_dir)},
            {"name": "tiny-shadow", "model_path": str(tiny_model_dir),
             "shadow": {"sample_rate": 1.0}},
        ],
    }  # fmt: skip
    # Keys are optional: calls without one pass, one with a key and one with an unknown key
    # give the key metrics data.
    key = {"name": "dashboard", "sha256": hash_secret("mg-dashboard")}
    # An upstream variant, for the routing panel.
    stub = StubUpstream().start()
    upstream = [{"name": "up", "backend": "openai", "upstream": {"replicas": [stub.url]}}]
    with live_server(upstream, experiments=json.dumps([experiment]), auth="optional",
                     keys=json.dumps([key])) as gateway:  # fmt: skip
        httpx.post(gateway + "/v1/completions", json={"model": "up", "prompt": "Hi"}, timeout=30)
        for secret in ("mg-dashboard", "mg-unknown"):
            httpx.post(gateway + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
        for body in (
            {"model": "tiny", "prompt": "Once upon", "max_tokens": 5},
            {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "stream": True},
            {"model": "tiny", "prompt": "", "max_tokens": 5},  # a 400
            {"model": "tiny", "prompt": "Once", "max_tokens": 3, "temperature": 0},  # a miss
            {"model": "tiny", "prompt": "Once", "max_tokens": 3, "temperature": 0},  # a hit
        ):
            httpx.post(gateway + "/v1/completions", json=body, timeout=30)
        work = tmp_path_factory.mktemp("prometheus")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "model-gateway",
                 "static_configs": [{"targets": [gateway.removeprefix("http://")]}]}
            ],
        }  # fmt: skip
        (work / "prometheus.yml").write_text(json.dumps(config))
        port = free_port()
        process = subprocess.Popen(
            [prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            # Three scrapes of the gateway: enough for rate() over one minute.
            wait_until(
                lambda: scrapes(url) >= 3, 60, "Prometheus to scrape the gateway three times"
            )
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)
            stub.stop()


def query(url: str, expr: str) -> dict[str, Any]:
    reply = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = reply.json()
    return body


def scrapes(url: str) -> int:
    try:
        result = query(url, 'count_over_time(up{job="model-gateway"}[1m])')["data"]["result"]
    except (httpx.TransportError, KeyError, ValueError):
        return 0
    return int(float(result[0]["value"][1])) if result else 0


@pytest.mark.parametrize("expr", dashboard_expressions())
def test_dashboard_expression_returns_data(prometheus: str, expr: str) -> None:
    answer = query(prometheus, substitute(expr))
    assert answer["status"] == "success", answer
    if not expr.startswith(NEEDS_GPU_OR_VLLM):
        assert answer["data"]["result"], f"no series for {expr}"


def test_template_variables_have_values(prometheus: str) -> None:
    for label in ("variant", "instance"):
        reply = httpx.get(
            f"{prometheus}/api/v1/label/{label}/values",
            params={"match[]": "model_gateway_requests_total"},
            timeout=10,
        ).json()
        assert reply["data"], label


def test_alert_rules_are_loaded_and_evaluate(prometheus: str) -> None:
    def groups() -> list[Any]:
        data: list[Any] = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"][
            "groups"
        ]
        return data

    wait_until(lambda: bool(groups()), 30, "the alert rules to load")
    rules = [rule for group in groups() for rule in group["rules"]]
    assert len(rules) >= 6
    wait_until(
        lambda: all(r.get("health") == "ok" for g in groups() for r in g["rules"]),
        30,
        "every rule to evaluate without error",
    )


def test_promtool_accepts_config_and_rules() -> None:
    promtool = binary("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_file_is_generated_from_its_source() -> None:
    source = runpy.run_path(str(DEPLOY / "grafana" / "dashboard.py"))
    assert DASHBOARD.read_text() == source["render"](), "run `make dashboard`"
