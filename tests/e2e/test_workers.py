"""A gateway process in front of two worker processes (the default model) over HTTP: the
same answers, fail-over when a worker dies, its return through health checks, and upstream
errors mapped to the client's API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.live_server import ServerProcess, free_port, live_server, metric_value, wait_until

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def upstream(*replicas: str, **options: Any) -> dict[str, Any]:
    return {"name": MODEL, "backend": "openai",
            "upstream": {"replicas": list(replicas), "health_check_interval_s": 0.2,
                         **options}}  # fmt: skip


@pytest.fixture(scope="module")
def workers() -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(), ServerProcess()]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gateway(workers: list[ServerProcess]) -> Iterator[str]:
    with live_server([upstream(*(w.url for w in workers))]) as url:
        yield url


def stream_text(url: str, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=NO_CACHE,
                      timeout=60) as reply:  # fmt: skip
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    key = "delta" if path.endswith("chat/completions") else None
    text = "".join(
        (c["choices"][0]["delta"].get("content") or "") if key else c["choices"][0]["text"]
        for c in chunks
    )
    return text, events


def test_gateway_answers_as_the_worker_does(gateway: str, workers: list[ServerProcess]) -> None:
    chat = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 20}
    direct = httpx.post(workers[0].url + "/v1/chat/completions", json=chat, timeout=60).json()
    through = httpx.post(gateway + "/v1/chat/completions", json=chat, headers=NO_CACHE,
                         timeout=60)  # fmt: skip
    assert through.status_code == 200
    assert through.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    assert through.json()["usage"] == direct["usage"]
    assert "Paris" in stream_text(gateway, "/v1/chat/completions", chat)[0]

    completion = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0,
                  "max_tokens": 8}  # fmt: skip
    expected = httpx.post(workers[1].url + "/v1/completions", json=completion, timeout=60)
    whole = httpx.post(gateway + "/v1/completions", json=completion, headers=NO_CACHE, timeout=60)
    assert whole.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
    text, events = stream_text(gateway, "/v1/completions", completion)
    assert text == expected.json()["choices"][0]["text"]
    assert events[-1] == "[DONE]"


def test_worker_killed_and_brought_back(gateway: str, workers: list[ServerProcess]) -> None:
    long = {"model": MODEL, "prompt": "Write a long story.", "temperature": 0,
            "max_tokens": 2000, "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", gateway + "/v1/completions", json=long, headers=NO_CACHE,
                      timeout=60) as reply:  # fmt: skip
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        busy = next(
            w for w in workers
            if metric_value(w.url, "model_gateway_requests_in_flight", endpoint="/v1/completions")
        )  # fmt: skip
        busy.kill()
        rest = [line for line in lines if line.startswith("data: ")]
    assert any('"error"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
    statuses = [
        httpx.post(gateway + "/v1/completions", json=body, headers=NO_CACHE, timeout=60).status_code
        for _ in range(10)
    ]
    assert statuses == [200] * 10  # fail-over: no error reaches the client

    busy.start()
    healthy = "model_gateway_upstream_replica_healthy"
    wait_until(lambda: metric_value(gateway, healthy, replica=busy.url) == 1, 30,
               "the restarted worker to pass its health check")  # fmt: skip
    served_before = metric_value(busy.url, "model_gateway_requests_total", status="200")
    for _ in range(6):
        httpx.post(gateway + "/v1/completions", json=body, headers=NO_CACHE, timeout=60)
    assert metric_value(busy.url, "model_gateway_requests_total", status="200") > served_before


def test_upstream_client_errors_pass_through(gateway: str, workers: list[ServerProcess]) -> None:
    too_long = {"model": MODEL, "prompt": "hi", "max_tokens": 100_000}
    reply = httpx.post(gateway + "/v1/completions", json=too_long, headers=NO_CACHE, timeout=30)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "max_tokens"
    tgi = httpx.post(gateway + "/generate", json={"inputs": "hi", "parameters": {
        "max_new_tokens": 100_000}}, timeout=30)  # fmt: skip
    assert tgi.status_code == 400
    assert tgi.json()["error_type"] == "upstream"

    wrong_model = upstream(workers[0].url, model="no-such-model")
    with live_server([wrong_model]) as url:
        reply = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"},
                           timeout=30)  # fmt: skip
        assert reply.status_code == 404
        assert "no-such-model" in reply.json()["error"]["message"]


class _Misbehaving(BaseHTTPRequestHandler):
    """Stand-in for a broken upstream (our worker cannot be made to fail on demand):
    healthy, but every generation answers 500 or never answers."""

    stall = threading.Event()
    mode = "500"

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode == "stall":
            self.stall.wait(30)
            return
        body = b'{"error": {"message": "CUDA error: out of memory"}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(params=["500", "stall"])
def misbehaving(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    handler = type("Handler", (_Misbehaving,), {"mode": request.param,
                                                 "stall": threading.Event()})  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", request.param
    handler.stall.set()
    server.shutdown()
    server.server_close()


def test_broken_stalled_and_refusing_upstreams(misbehaving: tuple[str, str]) -> None:
    broken, mode = misbehaving
    refused = f"http://127.0.0.1:{free_port()}"
    with live_server([upstream(broken)], request_timeout_s="1") as url:
        reply = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"},
                           timeout=30)  # fmt: skip
        if mode == "stall":
            assert reply.status_code == 504
            assert reply.json()["error"]["type"] == "timeout_error"
        else:
            assert reply.status_code == 502
            assert "out of memory" in reply.json()["error"]["message"]
    with live_server([upstream(refused)]) as url:
        reply = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"},
                           timeout=30)  # fmt: skip
        assert reply.status_code in (502, 503)
        assert reply.json()["error"]["type"] == "server_error"
