"""Accessors from a request to what `create_app` built (`app.state`) and to the per-request
context that the middleware set (`request.state`).

Plain functions that routes call, not FastAPI dependencies: resolving dependencies cost 8%
of a relayed request's CPU, and these need nothing but the request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.protocol import CacheControl
from app.service import Gateway


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    arrived_at: float  # time.monotonic()
    deadline: float  # time.monotonic()
    cache_control: CacheControl
    # Sticky A/B assignment: header X-User-Id, else the API key (the OpenAI `user` field,
    # where there is one, comes first).
    user_key: str | None
    forced_variant: str | None  # header X-Variant


def _cache_control(header: str) -> CacheControl:
    directives = {part.strip().split("=")[0].lower() for part in header.split(",")}
    return CacheControl(no_cache="no-cache" in directives, no_store="no-store" in directives)


# The headers a generation reads, found in one pass over the raw list (ASGI names are
# lower-case): Starlette's Headers.get scans the list again for each.
_CONTEXT_HEADERS = frozenset((b"cache-control", b"x-user-id", b"authorization", b"x-variant"))


def get_context(request: Request) -> RequestContext:
    arrived_at: float = request.state.arrived_at
    headers: dict[bytes, str] = {}
    for name, value in request.scope["headers"]:
        if name in _CONTEXT_HEADERS and name not in headers:  # the first, as Headers.get
            headers[name] = value.decode("latin-1")
    return RequestContext(
        request_id=request.state.request_id,
        arrived_at=arrived_at,
        deadline=arrived_at + request.app.state.settings.request_timeout_s,
        cache_control=_cache_control(headers.get(b"cache-control", "")),
        user_key=headers.get(b"x-user-id") or _bearer(headers.get(b"authorization", "")),
        forced_variant=headers.get(b"x-variant"),
    )


def _bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None
