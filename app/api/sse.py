"""Turning a generation's events into a reply: one JSON body, or a Server-Sent Events stream.

Both wait for the first event before answering, so anything wrong with the request
(validation, overload, queue deadline) still gets a proper status code; after that, a
stream can only end with an error event. A client that leaves cancels the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.protocol import (
    EngineError,
    GatewayError,
    Generation,
    GenerationEvent,
    ReplyInfo,
    TokenEvent,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Payload = dict[str, Any] | str  # a str is sent as is (OpenAI's "[DONE]")

# nginx and similar proxies buffer responses unless told not to.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED_REQUEST = 499


class ResponseShape(Protocol):
    """How one API spells a generation; one instance per request (it may keep state)."""

    def body(self, generation: Generation, tokens: list[TokenEvent]) -> Any: ...
    def opening(self) -> list[Payload]: ...
    def chunks(self, event: GenerationEvent) -> list[Payload]: ...
    def error(self, error: GatewayError) -> list[Payload]: ...
    def closing(self) -> list[Payload]: ...


class ClientDisconnectedError(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the work unwind (its cleanup frees engine slots) before answering.
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnectedError
    return task.result()


async def _collect(events: AsyncIterator[GenerationEvent]) -> tuple[Generation, list[TokenEvent]]:
    tokens: list[TokenEvent] = []
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event)
            else:
                return event, tokens
    raise EngineError("the generation ended without a result")


async def _first(events: AsyncIterator[GenerationEvent]) -> GenerationEvent:
    try:
        return await anext(events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise


def encode(payload: Payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _reply_headers(info: ReplyInfo, total_s: float | None = None) -> dict[str, str]:
    """Server-side timings in milliseconds, for a person debugging one call."""
    values = {
        "x-queue-time": info.queue_s,
        "x-time-to-first-token": info.ttft_s,
        "x-total-time": total_s,
    }
    headers = {name: f"{1000 * s:.1f}" for name, s in values.items() if s is not None}
    if info.cache is not None:
        headers["x-cache"] = info.cache
    return headers


async def respond(
    request: Request,
    events: AsyncIterator[GenerationEvent],
    shape: ResponseShape,
    *,
    stream: bool,
    info: ReplyInfo,
) -> Response:
    try:
        if not stream:
            generation, tokens = await until_disconnected(request, _collect(events))
            total_s = time.monotonic() - request.state.arrived_at
            return JSONResponse(
                shape.body(generation, tokens), headers=_reply_headers(info, total_s)
            )
        first = await until_disconnected(request, _first(events))
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return StreamingResponse(
        _stream(request, first, events, shape),
        media_type="text/event-stream",
        headers={**STREAM_HEADERS, **_reply_headers(info)},
    )


async def _stream(
    request: Request,
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    shape: ResponseShape,
) -> AsyncIterator[bytes]:
    payloads = shape.opening() + shape.chunks(first)
    async with aclosing(events):  # type: ignore[type-var]
        try:
            for payload in payloads:
                yield encode(payload)
            async for event in events:
                for payload in shape.chunks(event):
                    yield encode(payload)
        except GatewayError as exc:
            logger.warning("request %s: stream ended early: %s", request.state.request_id, exc)
            for payload in shape.error(exc):
                yield encode(payload)
    for payload in shape.closing():
        yield encode(payload)
