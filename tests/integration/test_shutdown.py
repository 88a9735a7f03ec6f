"""Stopping a server the way an orchestrator does (SIGTERM), on live processes: /ready fails
at once while requests are still served, streams in flight finish, the process exits within
its grace period; and a replica restarted under load costs no request when another takes
its traffic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.live_server import ServerProcess, live_server, wait_until
from tests.stub_upstream import StubUpstream

CHUNKS = 20
CHUNK_INTERVAL_S = 0.1  # a stream of two seconds
DRAIN_S = 1.0


@pytest.fixture
def upstream() -> Iterator[StubUpstream]:
    with StubUpstream(chunks=CHUNKS, chunk_interval_s=CHUNK_INTERVAL_S) as server:
        yield server


def test_sigterm_drains_then_finishes_streams_in_flight(upstream: StubUpstream) -> None:
    variant = {"name": "up", "backend": "openai", "upstream": {"replicas": [upstream.url]}}
    gateway = ServerProcess([variant], drain_s=str(DRAIN_S), shutdown_timeout_s="10")
    gateway.start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            body = {"model": "up", "prompt": "x", "max_tokens": CHUNKS, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                events = [next(line for line in lines if line.startswith("data: "))]
                signalled = time.monotonic()
                gateway.terminate()
                # Out of the load balancer's rotation at once...
                wait_until(lambda: client.get("/ready").status_code == 503, 1, "/ready to fail")
                assert client.get("/ready").json() == {"status": "draining"}
                # ...while requests still arriving are served...
                reply = client.post("/v1/completions", json={**body, "stream": False})
                assert reply.status_code == 200
                assert time.monotonic() - signalled < DRAIN_S
                # ...and the stream in flight runs to its end.
                events += [line for line in lines if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
            assert text == "".join(f" t{i}" for i in range(CHUNKS))
        assert gateway.wait(timeout_s=15) in (0, -15)
        # The drain, then the rest of the stream: within the grace period.
        assert time.monotonic() - signalled < DRAIN_S + CHUNKS * CHUNK_INTERVAL_S + 5
    finally:
        gateway.stop()


def test_a_worker_restarted_under_load_fails_no_request(tiny_model_dir: Path) -> None:
    variants = [{"name": "tiny", "model_path": str(tiny_model_dir)}]
    workers = [ServerProcess(variants, drain_s=str(DRAIN_S)) for _ in range(2)]
    for worker in workers:
        worker.start()
    upstream = {"replicas": [w.url for w in workers], "health_check_interval_s": 0.2}
    front = [{"name": "tiny", "backend": "openai", "upstream": upstream}]
    stop = threading.Event()
    outcomes: list[int | str] = []

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 4}
                try:
                    reply = client.post(gateway + "/v1/completions", json=body)
                    outcomes.append(reply.status_code)
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)

    try:
        with live_server(front, cache=json.dumps({"enabled": False})) as gateway, \
                ThreadPoolExecutor(4) as pool:  # fmt: skip
            running = [pool.submit(load) for _ in range(4)]
            wait_until(lambda: len(outcomes) >= 20, 30, "load to start")
            workers[0].terminate()
            assert workers[0].wait(timeout_s=15) in (0, -15)
            during = len(outcomes)
            workers[0].start()
            wait_until(lambda: len(outcomes) >= during + 50, 30, "load after the restart")
            stop.set()
            for future in running:
                future.result()
    finally:
        stop.set()
        for worker in workers:
            worker.stop()
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
