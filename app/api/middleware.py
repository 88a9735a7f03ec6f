"""Per-request edge concerns as one pure ASGI middleware: request id, arrival time, body size
limit, and the edge metrics (requests by status, duration to the last byte, in flight)."""

from __future__ import annotations

import os
import re
import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.metrics import Metrics
from app.protocol import PayloadTooLargeError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, endpoints: set[str], max_body_bytes: int
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._endpoints = endpoints
        self._max_body_bytes = max_body_bytes
        # Each request's counter and histogram, found once per label set: prometheus-client's
        # labels() takes a lock and builds keys, twice per request otherwise.
        self._observers: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._in_flight = {e: metrics.requests_in_flight.labels(e) for e in [*endpoints, "other"]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        arrived_at = time.monotonic()
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else os.urandom(16).hex()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, arrived_at=arrived_at)
        path = scope["path"]
        endpoint = path if path in self._endpoints else "other"
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if "variant" in state:
                    extra.append((b"x-variant", state["variant"].encode()))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            error = PayloadTooLargeError(
                f"the request body is larger than {self._max_body_bytes} bytes"
            )
            await error_response(path, error)(scope, receive, send_with_headers)
            self._observe(state, endpoint, status, arrived_at)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_body_bytes:
                    # A chunked body over the limit arrives cut short: it fails validation.
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        in_flight = self._in_flight[endpoint]
        in_flight.inc()
        try:
            await self._app(scope, limited_receive, send_with_headers)
        finally:
            in_flight.dec()
            self._observe(state, endpoint, status, arrived_at)

    def _observe(self, state: dict[str, str], endpoint: str, status: int, since: float) -> None:
        labels = (state.get("variant", ""), endpoint, str(status))
        observers = self._observers.get(labels)
        if observers is None:
            m = self._metrics
            observers = m.requests_total.labels(*labels), m.request_duration_seconds.labels(*labels)
            self._observers[labels] = observers
        observers[0].inc()
        observers[1].observe(time.monotonic() - since)
