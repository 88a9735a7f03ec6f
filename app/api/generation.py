"""The routes that generate (OpenAI's completions, TGI's generate, SageMaker's invocations),
served straight from an ASGI middleware rather than through FastAPI's routing, dependency and
body machinery: a relayed request costs the gateway 8-12% less CPU and 0.3-0.5 ms less added
latency so (BENCHMARKS.md). The body is validated by its pydantic model in one step from the
raw bytes; errors get the same replies as everywhere else (errors.py)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import (
    error_response,
    gateway_error_response,
    http_error_response,
    validation_error,
)
from app.protocol import GatewayError


@dataclass(frozen=True)
class GenerationRoute:
    """A POST route: its body's model, and the handler that answers the validated body."""

    body: type[BaseModel]
    handler: Callable[[Any, Request], Awaitable[ASGIApp]]
    tag: str  # its API's section in the OpenAPI schema


def document(app: FastAPI, routes: Mapping[str, GenerationRoute]) -> None:
    """List the routes, with their bodies, in the app's OpenAPI schema (/docs). FastAPI never
    runs these endpoints: `GenerationRoutes` answers those paths before FastAPI's router."""
    for path, route in routes.items():

        async def endpoint() -> None:
            raise AssertionError("served by GenerationRoutes")  # pragma: no cover

        body = inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=route.body)
        endpoint.__signature__ = inspect.Signature([body])  # type: ignore[attr-defined]
        app.add_api_route(path, endpoint, methods=["POST"], tags=[route.tag],
                          name=route.handler.__name__)  # fmt: skip


class GenerationRoutes:
    def __init__(self, app: ASGIApp, *, routes: Mapping[str, GenerationRoute]) -> None:
        self._app = app
        self._routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (route := self._routes.get(scope["path"])) is None:
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        request = Request(scope, receive)
        reply: ASGIApp
        if scope["method"] != "POST":
            reply = http_error_response(path, 405, "Method Not Allowed", {"Allow": "POST"})
        else:
            try:
                body = route.body.model_validate_json(await request.body())
                reply = await route.handler(body, request)
            except ClientDisconnect:
                return  # gone while sending the body: nobody to answer
            except ValidationError as exc:
                reply = error_response(path, validation_error(exc.errors()))
            except GatewayError as exc:
                reply = gateway_error_response(request, exc)
        await reply(scope, receive, send)
