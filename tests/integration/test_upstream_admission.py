"""Requests in front of an upstream whose replicas are all at their concurrency cap: they
wait at the gateway (not 429) and get freed slots by priority class, the keys of a class in
turn; the class reaches the upstream as vLLM's `priority` and our `X-Priority`; past
`max_waiting`, 429."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app.tenancy.keys import hash_secret
from tests.conftest import AppFactory
from tests.live_server import eventually, free_port
from tests.stub_upstream import json_response, read_request

BODY = json.dumps({"choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()  # fmt: skip
PRIORITIES = [b"interactive", b"standard", b"batch"]
KEYS = {name: (f"mg-{name}", priority) for name, priority in
        [("chat", "interactive"), ("standard", "standard"), ("bulk", "batch"),
         ("small", "batch")]}  # fmt: skip


class GatedUpstream:
    """An OpenAI-compatible server that holds every generation until the test lets one go,
    and records what reached it (the prompt, and the `priority` field) in order."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: list[tuple[str, Any]] = []
        self.gate: asyncio.Queue[None] = asyncio.Queue()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, headers, body = await read_request(reader)
                if line.startswith(b"POST"):
                    payload = json.loads(body)
                    assert headers[b"x-priority"] == PRIORITIES[payload["priority"]]
                    self.arrivals.append((payload["prompt"], payload.get("priority")))
                    await self.gate.get()
                    writer.write(json_response(BODY))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        try:
            yield f"http://127.0.0.1:{self.port}"
        finally:
            server.close()


async def test_waiting_requests_get_free_slots_by_class_then_key_in_turn(
    make_client: AppFactory,
) -> None:
    upstream = GatedUpstream()
    keys = [{"name": name, "sha256": hash_secret(secret), "priority": priority}
            for name, (secret, priority) in KEYS.items()]  # fmt: skip
    async with upstream.running() as url:
        variant = {"name": "up", "backend": "openai",
                   "upstream": {"replicas": [url], "max_concurrency_per_replica": 1,
                                "max_waiting": 7, "forward_priority": True}}  # fmt: skip
        async with make_client(variant, cache={"enabled": False}, auth="required",
                               keys=keys) as client:  # fmt: skip

            async def post(label: str, key: str) -> httpx.Response:
                body = {"model": "up", "prompt": label, "max_tokens": 1}
                headers = {"Authorization": f"Bearer {KEYS[key][0]}"}
                return await client.post("/v1/completions", json=body, headers=headers)

            queued: list[asyncio.Task[httpx.Response]] = []

            async def all_wait() -> bool:  # the first holds the one slot, the others wait
                metrics = (await client.get("/metrics")).text
                wait = f'model_gateway_upstream_waiting{{variant="up"}} {len(queued) - 1}.0'
                return len(upstream.arrivals) == 1 and wait in metrics

            senders = [("first", "standard"), *[(f"bulk{i}", "bulk") for i in range(4)],
                       ("small0", "small"), ("small1", "small"), ("chat", "chat")]  # fmt: skip
            for label, key in senders:  # one after another: arrival order is sending order
                queued.append(asyncio.create_task(post(label, key)))
                await eventually(all_wait, 5, f"{label} at the upstream or waiting")
            # One more than max_waiting: refused at once.
            refused = await post("one-too-many", "chat")
            assert refused.status_code == 429
            for _ in range(8):
                upstream.gate.put_nowait(None)
            replies = await asyncio.gather(*queued)
    assert all(reply.status_code == 200 for reply in replies)
    assert upstream.arrivals == [
        ("first", 1),
        ("chat", 0),
        ("bulk0", 2),
        ("small0", 2),
        ("bulk1", 2),
        ("small1", 2),
        ("bulk2", 2),
        ("bulk3", 2),
    ]
