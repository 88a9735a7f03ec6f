"""The edge: one pure ASGI middleware in front of every route. It gives each request its
`RequestContext` (request id, arrival, deadline, cache control, user key, forced variant,
API key and priority), refuses a generation call without a valid key (before its body is
read), bounds the reading of its body (`body.py`), and takes the edge metrics (requests by
variant, endpoint and status; duration to the last byte; in flight). It is the only writer of
`request.state`; the reply names its variant in `X-Variant`, which the metrics read.

A key comes as `Authorization: Bearer <key>` (OpenAI clients) or in `api-key` / `x-api-key`.
A request may lower its priority below its key's class with `X-Priority`; without keys
(auth off) it may ask for any class."""

from __future__ import annotations

import os
import re
import time

from fastapi import Request
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.body import BodyReaders
from app.api.errors import error_response
from app.domain import (
    PRIORITY_CLASSES,
    STANDARD_PRIORITY,
    AuthenticationError,
    CacheControl,
    GatewayError,
    InvalidRequestError,
    RequestContext,
    Tenant,
)
from app.metrics import Metrics
from app.tenancy.keys import KeyRing

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# The headers the edge reads, found in one pass over the raw list (ASGI names are
# lower-case): Starlette's Headers.get scans the list again for each.
_READ = frozenset(
    (b"x-request-id", b"content-length", b"cache-control", b"x-user-id", b"authorization",
     b"x-variant", b"api-key", b"x-api-key", b"x-priority")
)  # fmt: skip


def request_context(request: Request) -> RequestContext:
    context: RequestContext = request.scope["state"]["context"]
    return context


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        endpoints: set[str],
        bodies: BodyReaders,
        request_timeout_s: float,
        keys: KeyRing | None,
        key_required: bool,
        protected: set[str],
    ) -> None:
        """`keys`: None when auth is off; `protected`: the paths that need a key (and may
        ask for a priority)."""
        self._app = app
        self._metrics = metrics
        self._endpoints = endpoints
        self._bodies = bodies
        self._request_timeout_s = request_timeout_s
        self._keys = keys
        self._key_required = key_required
        self._protected = protected
        # Each request's counter and histogram, found once per label set: prometheus-client's
        # labels() takes a lock and builds keys, twice per request otherwise.
        self._observers: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._in_flight = {e: metrics.requests_in_flight.labels(e) for e in [*endpoints, "other"]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        arrived_at = time.monotonic()
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in _READ and name not in headers:  # the first, as Headers.get
                headers[name] = value.decode("latin-1")
        incoming_id = headers.get(b"x-request-id", "")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else os.urandom(16).hex()
        path = scope["path"]
        endpoint = path if path in self._endpoints else "other"
        status, variant = 500, ""
        error: GatewayError | None = None
        try:
            tenant, priority = self._identify(path, headers)
        except GatewayError as exc:
            tenant, priority, error = None, STANDARD_PRIORITY, exc
        context = RequestContext(
            request_id=request_id,
            arrived_at=arrived_at,
            deadline=arrived_at + self._request_timeout_s,
            cache_control=_cache_control(headers.get(b"cache-control", "")),
            # The key's name, never its secret, stands for the user in the A/B split.
            user_key=headers.get(b"x-user-id") or (tenant.name if tenant is not None else None),
            forced_variant=headers.get(b"x-variant"),
            tenant=tenant,
            priority=priority,
        )
        scope.setdefault("state", {})["context"] = context

        async def send_with_headers(message: Message) -> None:
            nonlocal status, variant
            if message["type"] == "http.response.start":
                status = message["status"]
                reply_headers = message.get("headers", [])
                for name, value in reply_headers:
                    if name == b"x-variant":
                        variant = value.decode("latin-1")
                message["headers"] = [*reply_headers, (b"x-request-id", request_id.encode())]
            await send(message)

        error = error or self._bodies.declared_too_large(headers.get(b"content-length", ""))
        if error is not None:
            # Refused before its body was read: the connection cannot carry another request.
            reply = error_response(path, error, {"Connection": "close"})
            await reply(scope, receive, send_with_headers)
            self._observe(variant, endpoint, status, arrived_at)
            return

        in_flight = self._in_flight[endpoint]
        in_flight.inc()
        try:
            receiver = self._bodies.receiver(receive, arrived_at)
            await self._app(scope, receiver, send_with_headers)
        finally:
            in_flight.dec()
            self._observe(variant, endpoint, status, arrived_at)

    def _identify(self, path: str, headers: dict[bytes, str]) -> tuple[Tenant | None, int]:
        """The key and priority of a call to a generation route (or /v1/models)."""
        if path not in self._protected:
            return None, STANDARD_PRIORITY
        tenant = None
        if self._keys is None:
            # Auth off: nothing to hold a request to, so it may pick any class. A worker
            # behind a gateway is told its requests' classes this way.
            highest = 0
        else:
            tenant = self._authenticate(self._keys, headers)
            highest = tenant.priority if tenant is not None else STANDARD_PRIORITY
        priority = tenant.priority if tenant is not None else STANDARD_PRIORITY
        asked = headers.get(b"x-priority")
        if asked is not None:  # never above `highest`
            priority = max(highest, _priority(asked))
        return tenant, priority

    def _authenticate(self, keys: KeyRing, headers: dict[bytes, str]) -> Tenant | None:
        secret = (
            headers.get(b"api-key")
            or headers.get(b"x-api-key")
            or _bearer(headers.get(b"authorization", ""))
        )
        try:
            if secret:
                return keys.authenticate(secret)
            if self._key_required:
                raise AuthenticationError(
                    "You didn't provide an API key: send it as Authorization: Bearer <key> "
                    "(or in the header api-key)"
                )
        except AuthenticationError:
            self._metrics.key_rejections_total.labels("", "unauthenticated").inc()
            raise
        return None

    def _observe(self, variant: str, endpoint: str, status: int, since: float) -> None:
        labels = (variant, endpoint, str(status))
        observers = self._observers.get(labels)
        if observers is None:
            m = self._metrics
            observers = m.requests_total.labels(*labels), m.request_duration_seconds.labels(*labels)
            self._observers[labels] = observers
        observers[0].inc()
        observers[1].observe(time.monotonic() - since)


def _cache_control(header: str) -> CacheControl:
    if not header:
        return CacheControl()
    directives = {part.strip().split("=")[0].lower() for part in header.split(",")}
    return CacheControl(no_cache="no-cache" in directives, no_store="no-store" in directives)


def _priority(name: str) -> int:
    try:
        return PRIORITY_CLASSES.index(name.strip().lower())
    except ValueError:
        raise InvalidRequestError(
            f"X-Priority must be one of {', '.join(PRIORITY_CLASSES)}", param="X-Priority"
        ) from None


def _bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
