"""Streams from an upstream: connections kept alive and reused, streamed replies included (a
stream left unread to its end would cost every request a new connection before its first
token); events split across packets, several events in one packet, and broken events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import AppFactory
from tests.live_server import eventually, free_port
from tests.stub_upstream import json_response, read_request


def _chunk(text: str, finish: str | None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = _chunk(" a", None) + _chunk(" b", "length") + b"data: [DONE]\n\n"
BODY = json.dumps({"choices": [{"index": 0, "text": " a b", "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()  # fmt: skip


class CountingUpstream:
    """An OpenAI-compatible server answering every generation with two tokens (chunked
    stream, or JSON), counting the connections generations come on. A stream is written as
    `writes`, each its own packet."""

    def __init__(self, writes: list[bytes] | None = None, *, cut: bool = False) -> None:
        self.port = free_port()
        self.generation_connections = 0
        self.writes = writes or [STREAM]
        self.cut = cut  # a stream's connection closed after `writes`, before its end

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            while True:
                line, _, body = await read_request(reader)
                if line.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                if not counted:
                    self.generation_connections += 1
                    counted = True
                if json.loads(body)["stream"]:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
                    for data in self.writes:
                        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                        await writer.drain()
                        # The next write (and the end of the body) comes in a later packet,
                        # as from real servers.
                        await asyncio.sleep(0.05)
                    if self.cut:
                        writer.close()
                        return
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(json_response(BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            # Cancelled: the test ended with the gateway gone mid-stream (a broken event).
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        try:
            yield f"http://127.0.0.1:{self.port}"
        finally:
            server.close()


@asynccontextmanager
async def gateway_client(
    make_client: AppFactory, upstream: CountingUpstream
) -> AsyncIterator[httpx.AsyncClient]:
    async with upstream.running() as url:
        variant = {"name": "up", "backend": "openai", "upstream": {"replicas": [url]}}
        async with make_client(variant, cache={"enabled": False}) as client:
            yield client


async def stream_events(client: httpx.AsyncClient) -> list[Any]:
    body = {"model": "up", "prompt": "x", "max_tokens": 2, "stream": True}
    reply = await client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    lines = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_streams_and_bodies_reuse_one_connection(make_client: AppFactory) -> None:
    upstream = CountingUpstream()
    async with gateway_client(make_client, upstream) as client:
        for stream in (True, False, True, True, False):
            body = {"model": "up", "prompt": "x", "max_tokens": 2, "stream": stream}
            reply = await client.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert ("a b" if not stream else " b") in reply.text
    assert upstream.generation_connections == 1


def texts(events: list[Any]) -> list[str]:
    return [e["choices"][0]["text"] for e in events if e.get("choices") and e["choices"][0]["text"]]


async def test_tokens_that_arrive_together_leave_together(make_client: AppFactory) -> None:
    one_by_one = [
        _chunk(" a", None),
        _chunk(" b", None),
        _chunk(" c", "length"),
        b"data: [DONE]\n\n",
    ]
    together = [b"".join(one_by_one[:2]), b"".join(one_by_one[2:])]
    async with gateway_client(make_client, CountingUpstream(one_by_one)) as client:
        assert texts(await stream_events(client)) == [" a", " b", " c"]
    async with gateway_client(make_client, CountingUpstream(together)) as client:
        assert texts(await stream_events(client)) == [" a b", " c"]


async def test_an_event_split_across_packets(make_client: AppFactory) -> None:
    event = _chunk(" split", None)
    writes = [event[:9], event[9:20], event[20:] + _chunk(" end", "length")[:4],
              _chunk(" end", "length")[4:] + b"data: [DONE]\n\n"]  # fmt: skip
    async with gateway_client(make_client, CountingUpstream(writes)) as client:
        events = await stream_events(client)
    assert "".join(texts(events)) == " split end"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "broken",
    [b"data: {not json\n\n", b"data: [1, 2]\n\n", b'data: {"error": "engine died"}\n\n',
     b'data: {"choices": [{"text": 7}]}\n\n' + _chunk("", None)[:-2]],
    ids=["not JSON", "not an object", "an error", "a number for text, then no finish"],
)  # fmt: skip
async def test_a_broken_event_ends_the_stream_with_an_error_event(
    make_client: AppFactory, broken: bytes
) -> None:
    async with gateway_client(
        make_client, CountingUpstream([_chunk(" a", None), broken])
    ) as client:
        events = await stream_events(client)
    assert texts(events) == [" a"]
    assert events[-1]["error"]["type"] == "server_error"


async def test_a_stream_cut_by_the_upstream_ends_with_an_error_in_our_words(
    make_client: AppFactory,
) -> None:
    upstream = CountingUpstream([_chunk(" a", None), _chunk(" b", None)], cut=True)
    async with gateway_client(make_client, upstream) as client:
        events = await stream_events(client)
    assert texts(events) == [" a", " b"]
    message = events[-1]["error"]["message"]
    assert message == "the upstream closed the stream after 2 chunk(s), before its end"


async def test_a_long_prompt_is_cached_like_any_other(make_client: AppFactory) -> None:
    upstream = CountingUpstream()
    async with upstream.running() as url:
        variant = {"name": "up", "backend": "openai", "upstream": {"replicas": [url]}}
        async with make_client(variant) as client:
            body = {"model": "up", "prompt": "x" * 10_000, "max_tokens": 2, "temperature": 0}
            first = await client.post("/v1/completions", json=body)
            assert first.headers["x-cache"] == "miss"

            async def hit() -> bool:  # stored after the first reply has left
                reply = await client.post("/v1/completions", json=body)
                return bool(reply.headers["x-cache"] == "hit")

            await eventually(hit, 5, "a cache hit")


async def test_a_usage_that_is_not_an_object_is_ignored(make_client: AppFactory) -> None:
    odd = b'data: {"choices": [{"text": " b", "finish_reason": "length"}], "usage": [3]}\n\n'
    upstream = CountingUpstream([_chunk(" a", None), odd + b"data: [DONE]\n\n"])
    async with gateway_client(make_client, upstream) as client:
        events = await stream_events(client)
    assert texts(events) == [" a", " b"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
