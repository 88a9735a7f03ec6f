"""`FastRoute`: FastAPI's `APIRoute` for the routes that generate, without FastAPI's
per-request dependency machinery (a relayed request's largest cost in the framework:
BENCHMARKS.md). The body is validated by its pydantic model in one step from the raw bytes
and the endpoint called with it and the request. The function FastAPI documents is the
function served, and exception handlers apply as to any route.

An endpoint takes `(body: SomeModel, request: Request)` and returns an ASGI app (a JSON
response or an event stream). A route that declares anything else — a dependency (its own,
its router's or the app's), a query, path or header parameter — is refused when it is
registered, since it would be skipped silently."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import fastapi.routing
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp

from app.api.errors import CLIENT_CLOSED_REQUEST, validation_error
from app.domain import UnsupportedMediaTypeError

Endpoint = Callable[[Any, Request], Awaitable[ASGIApp]]


class FastRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        body_model = _body_model(_effective(self))
        endpoint = cast(Endpoint, self.endpoint)

        async def handler(request: Request) -> Response:
            _check_media_type(request)
            try:
                raw = await request.body()
            except ClientDisconnect:  # gone while sending the body: nobody to answer
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            try:
                body = body_model.model_validate_json(raw)
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            # An ASGI app like any Response: Starlette only calls it.
            return cast(Response, await endpoint(body, request))

        return handler


def _check_media_type(request: Request) -> None:
    """A body declared as something other than JSON is refused (415), as TGI does; one
    declared as nothing is read as JSON, as OpenAI's API does."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the body must be JSON, sent with Content-Type: application/json (not {media_type})"
        )


def _effective(route: APIRoute) -> APIRoute:
    """The route as included: a router's (or the app's) dependencies are merged into a
    per-inclusion copy that FastAPI builds the handler for."""
    var = getattr(fastapi.routing, "_effective_route_context_var", None)
    context = var.get() if var is not None else None
    if context is not None and context.original_route is route:
        return cast(APIRoute, context)
    return route


def _body_model(route: APIRoute) -> type[BaseModel]:
    d = route.dependant
    params = [*d.path_params, *d.query_params, *d.header_params, *d.cookie_params]
    body = d.body_params[0].field_info.annotation if len(d.body_params) == 1 else None
    if (
        d.dependencies
        or params
        or d.request_param_name is None
        or not (isinstance(body, type) and issubclass(body, BaseModel))
    ):
        raise TypeError(
            f"{route.path}: a FastRoute endpoint takes (body: <a pydantic model>, request: "
            "Request) and nothing else; FastAPI's dependencies and parameters do not run on it"
        )
    return body
