"""Stopping a server the way an orchestrator does (SIGTERM), on live processes: /ready fails
at once while requests are still served, streams in flight finish, the process exits within
its grace period; and a replica restarted under load costs no request when another takes
its traffic."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.live_server import ServerProcess, free_port, live_server, wait_until

CHUNKS = 20
CHUNK_INTERVAL_S = 0.1  # a stream of two seconds
DRAIN_S = 1.0


def _chunk(text: str, finish: str | None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class SlowUpstream:
    """An OpenAI-compatible server in a thread of its own: streams CHUNKS tokens, one every
    CHUNK_INTERVAL_S; answers a JSON body at once."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                elif json.loads(body)["stream"]:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
                    for i in range(CHUNKS):
                        last = i == CHUNKS - 1
                        data = _chunk(f" t{i}", "length" if last else None)
                        if last:
                            data += b"data: [DONE]\n\n"
                        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                        await writer.drain()
                        await asyncio.sleep(CHUNK_INTERVAL_S)
                    writer.write(b"0\r\n\r\n")
                else:
                    choice = {"index": 0, "text": " ok", "finish_reason": "length"}
                    reply = json.dumps({"choices": [choice]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(reply), reply))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    def _run(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def __enter__(self) -> SlowUpstream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def upstream() -> Iterator[SlowUpstream]:
    with SlowUpstream() as server:
        yield server


def test_sigterm_drains_then_finishes_streams_in_flight(upstream: SlowUpstream) -> None:
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
