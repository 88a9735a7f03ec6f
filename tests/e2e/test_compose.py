"""The compose stack for real: the images built (on a Debian base made here: no registry can
be pulled), `docker-compose up` with model preparation, two CTranslate2 workers, the gateway,
Redis and Prometheus; requests through the gateway's port on 127.0.0.1; scaled to three
workers and balanced; a worker killed without a failed request; Prometheus's targets up.
Skipped, saying so, only where the Docker engine cannot run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from app.tenancy.keys import hash_secret
from tests.live_server import ROOT, free_port, wait_until

pytestmark = pytest.mark.timeout(1800)  # a first build installs torch for model preparation

BASE_IMAGE = "model-gateway-base:bookworm"
SECRET = "mg-compose-test"
ADMIN_TOKEN = "compose-admin"
MODEL = "smollm2-135m-instruct"
# Without BuildKit: the Docker clients of these machines have no buildx; the Dockerfile
# needs none.
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def run(*command: str, env: dict[str, str] | None = None, timeout_s: float = 900) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env or DOCKER_ENV, capture_output=True,
                          text=True, timeout=timeout_s)  # fmt: skip
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def _has_image(name: str) -> bool:
    inspect = ["docker", "image", "inspect", name]
    return subprocess.run(inspect, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def images() -> None:
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("the Docker engine is not running and could not be started here "
                    "(tests/system-deps.sh starts it where it can)")  # fmt: skip
    if not _has_image(BASE_IMAGE):
        run("deploy/docker/base-image.sh", BASE_IMAGE, timeout_s=600)
    # A CPU build of torch for the preparation image, where pip has one (PyPI's is CUDA's).
    run(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--dest", ".docker-build", "torch==2.13.0")  # fmt: skip
    run("make", "images", f"BASE_IMAGE={BASE_IMAGE}", timeout_s=1500)
    for target, tag in (("redis", "redis:debian"), ("prometheus", "prom/prometheus:debian")):
        run("docker", "build", "--quiet", "--network", "host", "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}", "-f", "deploy/docker/Dockerfile.debian-services",
            "--target", target, "-t", tag, "deploy/docker")  # fmt: skip


@dataclass
class Stack:
    gateway: str
    prometheus: str
    env: dict[str, str]

    def compose(self, *args: str, timeout_s: float = 900) -> str:
        return run("docker-compose", *args, env=self.env, timeout_s=timeout_s)

    def workers(self) -> list[str]:
        return self.compose("ps", "-q", "worker-ct2").split()

    def post(self, client: httpx.Client, prompt: str) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        headers = {"Authorization": f"Bearer {SECRET}", "Cache-Control": "no-cache, no-store"}
        return client.post(self.gateway + "/v1/completions", json=body, headers=headers)


@pytest.fixture(scope="module")
def stack(images: None) -> Iterator[Stack]:
    env = {
        **DOCKER_ENV,
        "COMPOSE_PROJECT_NAME": f"mgtest{os.getpid()}",
        "BIND_ADDRESS": "127.0.0.1",
        "GATEWAY_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "REDIS_TAG": "debian",
        "PROMETHEUS_TAG": "debian",
        "GATEWAY_KEYS": json.dumps([{"name": "compose", "sha256": hash_secret(SECRET)}]),
        "ADMIN_TOKEN": ADMIN_TOKEN,
    }
    stack = Stack(f"http://127.0.0.1:{env['GATEWAY_PORT']}",
                  f"http://127.0.0.1:{env['PROMETHEUS_PORT']}", env)  # fmt: skip
    try:
        stack.compose("up", "-d", "--no-build", "--scale", "worker-ct2=2", "gateway",
                      "prometheus")  # fmt: skip
        wait_until(lambda: _status(stack.gateway + "/ready") == 200, 600, "the gateway ready")
        yield stack
    finally:
        subprocess.run(["docker-compose", "logs", "--tail", "30"], cwd=ROOT, env=env)
        stack.compose("down", "-v", "--remove-orphans")


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_requests_through_the_gateway(stack: Stack) -> None:
    with httpx.Client(timeout=60) as client:
        reply = stack.post(client, "The capital of France is")
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-variant"] in {"int8", "float32"}
        assert reply.json()["usage"]["completion_tokens"] > 0
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert client.post(stack.gateway + "/v1/completions", json=body).status_code == 401


def test_prometheus_scrapes_every_target(stack: Stack) -> None:
    def all_up() -> bool:
        targets = httpx.get(stack.prometheus + "/api/v1/targets", timeout=5).json()
        active = targets["data"]["activeTargets"]
        jobs = {t["labels"]["job"] for t in active}
        return (
            len(active) == 3
            and jobs == {"model-gateway", "model-gateway-workers"}
            and all(t["health"] == "up" for t in active)
        )

    wait_until(all_up, 90, "the gateway and both workers up in Prometheus")
    query = {"query": "sum(model_gateway_requests_total)"}

    def queryable() -> bool:
        result = httpx.get(stack.prometheus + "/api/v1/query", params=query, timeout=5).json()
        return bool(result["data"]["result"]) and float(result["data"]["result"][0]["value"][1]) > 0

    wait_until(queryable, 60, "a gateway metric in Prometheus")


def _served_completions(container: str) -> float:
    """Completions the worker in `container` has answered, from its own /metrics."""
    metrics = run("docker", "exec", container, "python3", "-c",
                  "import urllib.request as u; "
                  "print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())")  # fmt: skip
    pattern = r'model_gateway_requests_total\{[^}]*endpoint="/v1/completions"[^}]*\} (\S+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


def test_scaled_to_three_workers_the_gateway_balances(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker-ct2=3",
                  "worker-ct2")  # fmt: skip
    workers = stack.workers()
    assert len(workers) == 3

    def three_replicas() -> bool:
        metrics = httpx.get(stack.gateway + "/metrics", timeout=5).text
        healthy = re.findall(r'model_gateway_upstream_replica_healthy\{replica="([^"]+)",'
                             r'variant="int8"\} 1\.0', metrics)  # fmt: skip
        return len(set(healthy)) == 3

    # The gateway resolves the service name again every 30 s.
    wait_until(three_replicas, 120, "the gateway to find three workers")
    before = {w: _served_completions(w) for w in workers}
    with httpx.Client(timeout=60) as client:
        for i in range(45):
            assert stack.post(client, f"Story {i}:").status_code == 200
    served = {w: _served_completions(w) - before[w] for w in workers}
    assert all(n > 0 for n in served.values()), served


def test_a_worker_killed_fails_no_request(stack: Stack) -> None:
    stop = threading.Event()
    outcomes: list[int | str] = []

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    outcomes.append(stack.post(client, f"Tale {i}:").status_code)
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(outcomes) >= 10, 60, "load to start")
        run("docker", "kill", stack.workers()[0])
        killed_at = len(outcomes)
        wait_until(lambda: len(outcomes) >= killed_at + 40, 120, "load after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
