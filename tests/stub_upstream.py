"""An OpenAI-compatible stand-in for an upstream server (a worker, vLLM), in a thread of its
own so that live gateway processes can reach it: it records the prompts it is sent, answers
a JSON body after `reply_delay_s`, streams `chunks` tokens `chunk_interval_s` apart, and
can be stopped (a replica that dies) and started again on its port."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from tests.live_server import free_port


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 request off a kept-alive connection: its request line, its headers (names
    in lower case) and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head.rstrip(b"\r\n").split(b"\r\n")
    headers = {}
    for field in fields:
        name, _, value = field.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def json_response(body: bytes) -> bytes:
    """A whole HTTP/1.1 200 response carrying the JSON `body`."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body)  # fmt: skip


def _chunk(text: str, finish: str | None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class StubUpstream:
    def __init__(
        self, *, reply_delay_s: float = 0.0, chunks: int = 4, chunk_interval_s: float = 0.0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prompts: list[str] = []
        self._reply_delay_s = reply_delay_s
        self._chunks = chunks
        self._chunk_interval_s = chunk_interval_s
        self._thread: threading.Thread | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, _, body = await read_request(reader)
                if line.startswith(b"GET"):  # the health check
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                else:
                    await self._answer(line.split()[1].decode(), json.loads(body), writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    async def _answer(self, path: str, payload: Any, writer: asyncio.StreamWriter) -> None:
        self.prompts.append(str(payload.get("prompt", payload.get("messages"))))
        if payload["stream"]:
            await self._stream(writer)
        else:
            await asyncio.sleep(self._reply_delay_s)
            choice = {"index": 0, "text": " ok", "finish_reason": "length"}
            writer.write(json_response(json.dumps({"choices": [choice]}).encode()))

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        for i in range(self._chunks):
            last = i == self._chunks - 1
            data = _chunk(f" t{i}", "length" if last else None)
            if last:
                data += b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(self._chunk_interval_s)
        writer.write(b"0\r\n\r\n")

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    def start(self) -> StubUpstream:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._loop, ready), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> StubUpstream:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
