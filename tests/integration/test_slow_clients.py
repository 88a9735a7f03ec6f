"""Clients that send their bodies slowly, against a live server (the wire matters here): a
body that stops arriving is cut off with 408 and its connection closed; many slow senders at
once make room for working clients instead of taking their places."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.live_server import live_server

BODY_TIMEOUT_S = 1.0
MAX_READERS = 8


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    variants = [{"name": "tiny", "model_path": str(tiny_model_dir)}]
    with live_server(variants, body_timeout_s=str(BODY_TIMEOUT_S),
                     max_body_readers=str(MAX_READERS)) as url:  # fmt: skip
        yield url


def slow_request(url: str, path: str, sent: bytes, length: int = 200) -> socket.socket:
    """A request whose headers and the first bytes of its body are sent, and no more."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + sent)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the reply; then the connection must be closed."""
    data = b""
    while chunk := sock.recv(65536):  # to EOF: the server closes the connection
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("path", "sent"), [("/v1/completions", b'{"mo'), ("/generate", b""), ("/", b'{"in')]
)
def test_a_body_that_stops_arriving_is_cut_off(server: str, path: str, sent: bytes) -> None:
    started = time.monotonic()
    with slow_request(server, path, sent) as sock:
        status, headers, body = read_reply(sock)
    waited = time.monotonic() - started
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["x-request-id"]
    error = json.loads(body)["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert f"within {BODY_TIMEOUT_S:g} s" in message
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 3


def test_slow_senders_make_room_for_working_clients(server: str) -> None:
    slow = [
        slow_request(server, "/v1/completions", b'{"model": "ti') for _ in range(3 * MAX_READERS)
    ]
    try:
        # Each new slow sender past MAX_READERS cuts off the one arriving longest: the
        # first ones are answered long before their timeout.
        with ThreadPoolExecutor(len(slow)) as pool:
            started = time.monotonic()
            replies = list(pool.map(read_reply, slow[: 2 * MAX_READERS]))
            evicted_within = time.monotonic() - started
        assert {status for status, _, _ in replies} == {408}
        assert evicted_within < BODY_TIMEOUT_S, evicted_within
        assert "too many others" in json.loads(replies[0][2])["error"]["message"]
        # A working client, with the last slow senders still holding their places.
        started = time.monotonic()
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        reply = httpx.post(server + "/v1/completions", json=body, timeout=10)
        assert reply.status_code == 200
        assert time.monotonic() - started < BODY_TIMEOUT_S
    finally:
        for sock in slow:
            sock.close()
