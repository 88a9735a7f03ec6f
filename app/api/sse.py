"""Turning the service's `Reply` into an HTTP reply: one JSON body, or a Server-Sent Events
stream, shaped by the API's `ResponseShape`.

Both wait for the first event before answering, so anything wrong with the request
(validation, overload, queue deadline) still gets a proper status code; after that, a
stream can only end with an error event. A client that leaves cancels the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.edge import request_context
from app.api.errors import CLIENT_CLOSED_REQUEST, gateway_error_response
from app.domain import (
    EngineError,
    GatewayError,
    Generation,
    GenerationEvent,
    Reply,
    RequestContext,
    Timings,
    TokenEvent,
)

logger = logging.getLogger(__name__)

Payload = dict[str, Any] | str  # a str is sent as is (OpenAI's "[DONE]")

# A streamed reply, as a route documents it beside its JSON body: `itemSchema` (OpenAPI 3.2's
# word for it) describes each event; its `data` is one JSON object (or OpenAI's `[DONE]`).
EVENT_STREAM: dict[str, Any] = {
    "text/event-stream": {
        "itemSchema": {
            "type": "object",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            "required": ["data"],
        }
    }
}
# nginx and similar proxies buffer responses unless told not to.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ResponseShape(Protocol):
    """How one API spells a generation; one instance per request (it may keep state)."""

    def body(self, generation: Generation, tokens: list[TokenEvent]) -> Any: ...
    def opening(self) -> list[Payload]: ...
    def chunks(self, event: GenerationEvent) -> list[Payload]: ...
    def error(self, error: GatewayError) -> list[Payload]: ...
    def closing(self) -> list[Payload]: ...


class DisconnectWatch:
    """`async with DisconnectWatch(receive) as watch:` cancels the body of the block if the
    client goes away meanwhile, and leaves the block with `watch.gone` set. One task watches
    for the disconnect while the request's own task does the work."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._done = False

    async def __aenter__(self) -> DisconnectWatch:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # The server also reports a disconnect once the response is complete: not a leaver.
        if not self._done:
            self.gone = True
            self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self._done = True
        self._watcher.cancel()
        if self.gone and exc_type is asyncio.CancelledError:
            self._task.uncancel()
            return True
        return False


async def _collect(events: AsyncIterator[GenerationEvent]) -> tuple[Generation, list[TokenEvent]]:
    tokens: list[TokenEvent] = []
    generation: Generation | None = None
    async with aclosing(events):  # type: ignore[type-var]
        # To the end, past the Generation: every layer below then ends by itself, rather
        # than each being closed later by the event loop in a task of its own.
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event)
            else:
                generation = event
    if generation is None:
        raise EngineError("the generation ended without a result")
    return generation, tokens


async def _first(events: AsyncIterator[GenerationEvent]) -> GenerationEvent:
    try:
        return await anext(events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise


def encode(payload: Payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _reply_headers(
    variant: str, timings: Timings, elapsed_s: float, *, done: bool
) -> dict[str, str]:
    """The variant, and server-side timings in milliseconds, for a person debugging one
    call. `elapsed_s`: since arrival, to the reply's end (`done`) or to its first event (a
    stream's headers leave then: its overhead header covers that much)."""
    values = {
        "x-queue-time": timings.queue_s,
        "x-time-to-first-token": timings.ttft_s,
        "x-total-time": elapsed_s if done else None,
        "x-gateway-overhead-ms": timings.overhead_s(elapsed_s),
    }
    headers = {name: f"{1000 * s:.1f}" for name, s in values.items() if s is not None}
    if timings.cache is not None:
        headers["x-cache"] = timings.cache
    if timings.quota is not None:
        headers.update(timings.quota.headers())
    headers["x-variant"] = variant
    return headers


async def respond(request: Request, reply: Reply, shape: ResponseShape, *, stream: bool) -> ASGIApp:
    context, events = request_context(request), reply.events
    try:
        async with DisconnectWatch(request.receive) as watch:
            if stream:
                first = await _first(events)
            else:
                generation, tokens = await _collect(events)
    except GatewayError as exc:  # about this request, on its variant
        return gateway_error_response(request, exc, {"x-variant": reply.variant})
    if watch.gone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    overhead = request.app.state.metrics.overhead(reply.variant, request.scope["path"])
    if stream:
        elapsed_s = time.monotonic() - context.arrived_at
        headers = _reply_headers(reply.variant, reply.timings, elapsed_s, done=False)
        return EventStream(context, first, events, shape, headers, reply.timings, overhead)
    response = JSONResponse(shape.body(generation, tokens))
    elapsed_s = time.monotonic() - context.arrived_at
    response.headers.update(_reply_headers(reply.variant, reply.timings, elapsed_s, done=True))
    overhead.observe(reply.timings.overhead_s(elapsed_s))
    return response


class EventStream:
    """The rest of a stream whose first event has arrived, as Server-Sent Events; a client
    that leaves cancels the generation."""

    def __init__(
        self,
        context: RequestContext,
        first: GenerationEvent,
        events: AsyncIterator[GenerationEvent],
        shape: ResponseShape,
        headers: dict[str, str],
        timings: Timings,
        overhead: Histogram,
    ) -> None:
        self._context = context
        self._timings = timings
        self._overhead = overhead
        self._first = first
        self._events = events
        self._shape = shape
        headers = {"content-type": "text/event-stream; charset=utf-8", **STREAM_HEADERS, **headers}
        self._headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with DisconnectWatch(receive) as watch:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async for data in self._body():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if not watch.gone:  # a stream cut short by its client says little about the gateway
            elapsed_s = time.monotonic() - self._context.arrived_at
            self._overhead.observe(self._timings.overhead_s(elapsed_s))

    async def _body(self) -> AsyncIterator[bytes]:
        shape, events = self._shape, self._events
        async with aclosing(events):  # type: ignore[type-var]
            try:
                for payload in shape.opening() + shape.chunks(self._first):
                    yield encode(payload)
                async for event in events:
                    for payload in shape.chunks(event):
                        yield encode(payload)
            except GatewayError as exc:
                logger.warning("request %s: stream ended early: %s", self._context.request_id,
                               exc)  # fmt: skip
                for payload in shape.error(exc):
                    yield encode(payload)
        for payload in shape.closing():
            yield encode(payload)
