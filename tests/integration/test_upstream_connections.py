"""Connections to an upstream are kept alive and reused, streamed replies included (a stream
left unread to its end would cost every request a new connection before its first token)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.live_server import free_port


def _chunk(text: str, finish: str | None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = _chunk(" a", None) + _chunk(" b", "length") + b"data: [DONE]\n\n"
BODY = json.dumps({"choices": [{"index": 0, "text": " a b", "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()  # fmt: skip


class CountingUpstream:
    """An OpenAI-compatible server answering every generation with two tokens (chunked
    stream, or JSON), counting the connections generations come on."""

    def __init__(self) -> None:
        self.port = free_port()
        self.generation_connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                if not counted:
                    self.generation_connections += 1
                    counted = True
                if json.loads(body)["stream"]:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
                    writer.write(b"%x\r\n%s\r\n" % (len(STREAM), STREAM))
                    await writer.drain()
                    # The end of the body comes in a later packet, as from real servers.
                    await asyncio.sleep(0.05)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        try:
            yield f"http://127.0.0.1:{self.port}"
        finally:
            server.close()


async def test_streams_and_bodies_reuse_one_connection() -> None:
    upstream = CountingUpstream()
    async with upstream.running() as url:
        variant = {"name": "up", "backend": "openai", "upstream": {"replicas": [url]}}
        app = create_app(Settings(variants=[variant], cache={"enabled": False}))
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
            ) as client,
        ):
            for stream in (True, False, True, True, False):
                body = {"model": "up", "prompt": "x", "max_tokens": 2, "stream": stream}
                reply = await client.post("/v1/completions", json=body)
                assert reply.status_code == 200, reply.text
                assert ("a b" if not stream else " b") in reply.text
        assert upstream.generation_connections == 1
