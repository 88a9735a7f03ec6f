"""The one table from domain errors to HTTP replies, in the style of the API they came through:
the OpenAI error object on `/v1/*`, TGI's `{"error", "error_type"}` elsewhere; and the same
table as each route's documented error responses."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.domain import (
    AuthenticationError,
    ContextLengthError,
    DeadlineExceededError,
    EngineError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
    UpstreamError,
)

logger = logging.getLogger(__name__)

# nginx's status for a client that left before its reply: logged, never received.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class ErrorKind:
    openai_status: int
    openai_type: str
    openai_code: str | None
    tgi_status: int
    tgi_type: str


# Most specific first: the first matching class wins.
ERROR_TABLE: list[tuple[type[GatewayError], ErrorKind]] = [
    (
        ContextLengthError,
        ErrorKind(400, "invalid_request_error", "context_length_exceeded", 422, "validation"),
    ),
    (PayloadTooLargeError,
     ErrorKind(413, "invalid_request_error", "request_too_large", 413, "validation")),
    (UnsupportedMediaTypeError,
     ErrorKind(415, "invalid_request_error", "unsupported_media_type", 415, "validation")),
    (RequestTimeoutError,
     ErrorKind(408, "invalid_request_error", "request_timeout", 408, "timeout")),
    (InvalidRequestError, ErrorKind(400, "invalid_request_error", None, 422, "validation")),
    (ModelNotFoundError,
     ErrorKind(404, "invalid_request_error", "model_not_found", 422, "validation")),
    (NotFoundError, ErrorKind(404, "invalid_request_error", "not_found", 404, "not_found")),
    (AuthenticationError,
     ErrorKind(401, "invalid_request_error", "invalid_api_key", 401, "authentication")),
    (PermissionDeniedError,
     ErrorKind(403, "invalid_request_error", "permission_denied", 403, "permission")),
    (RateLimitedError,
     ErrorKind(429, "rate_limit_error", "rate_limit_exceeded", 429, "rate_limit")),
    (OverloadedError, ErrorKind(429, "rate_limit_error", "server_overloaded", 429, "overloaded")),
    (DeadlineExceededError, ErrorKind(504, "timeout_error", "timeout", 504, "timeout")),
    (NotReadyError, ErrorKind(503, "service_unavailable", None, 503, "unavailable")),
    (EngineError, ErrorKind(500, "server_error", None, 424, "generation")),
]  # fmt: skip


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class TGIErrorResponse(BaseModel):
    error: str
    error_type: str


def documented_errors(
    openai: bool, statuses: Iterable[int] | None = None
) -> dict[int | str, dict[str, Any]]:
    """Error replies for a route's `responses`, in its API's style: `statuses`, by default
    every status of the table; and any other (an upstream's own, passed through) as
    `default`."""
    model = OpenAIErrorResponse if openai else TGIErrorResponse
    if statuses is None:
        statuses = {kind.openai_status if openai else kind.tgi_status for _, kind in ERROR_TABLE}
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": model, "description": HTTPStatus(status).phrase}
        for status in sorted(statuses)
    }
    if 429 in responses:
        responses[429]["headers"] = {
            "Retry-After": {"description": "seconds", "schema": {"type": "integer"}},
            **{
                f"x-ratelimit-{what}-{kind}": {
                    "description": f"the API key's {kind} per minute: {meaning}",
                    "schema": {"type": "string"},
                }
                for kind in ("requests", "tokens")
                for what, meaning in (
                    ("limit", "the limit"),
                    ("remaining", "what is left now"),
                    ("reset", "time until the limit is whole again, as 1s, 6m0s or 20ms"),
                )
            },
        }
    responses["default"] = {"model": model, "description": "any other error"}
    return responses


def _kind(error: GatewayError) -> ErrorKind:
    if isinstance(error, UpstreamError):  # the upstream's own status, passed through
        openai_type = "server_error" if error.status >= 500 else "invalid_request_error"
        return ErrorKind(error.status, openai_type, None, error.status, "upstream")
    for cls, kind in ERROR_TABLE:
        if isinstance(error, cls):
            return kind
    return ErrorKind(500, "server_error", None, 500, "internal")


def openai_error_body(error: GatewayError) -> dict[str, Any]:
    kind = _kind(error)
    return {
        "error": {
            "message": error.message,
            "type": kind.openai_type,
            "param": error.param,
            "code": kind.openai_code,
        }
    }


def tgi_error_body(error: GatewayError) -> dict[str, Any]:
    return {"error": error.message, "error_type": _kind(error).tgi_type}


def is_openai_path(path: str) -> bool:
    """Paths whose errors are OpenAI error objects: the OpenAI API, and our admin API."""
    return path.startswith(("/v1/", "/admin/"))


def error_response(
    path: str, error: GatewayError, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = _kind(error)
    headers = dict(headers or {})
    if isinstance(error, OverloadedError):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, RateLimitedError) and error.quota is not None:
        headers.update(error.quota.headers())
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, PayloadTooLargeError | RequestTimeoutError):
        headers["Connection"] = "close"  # the rest of its body is not read
    if is_openai_path(path):
        return JSONResponse(openai_error_body(error), kind.openai_status, headers=headers)
    return JSONResponse(tgi_error_body(error), kind.tgi_status, headers=headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|nullable)\b|^function-|\[")


def validation_error(errors: Sequence[Any]) -> InvalidRequestError:
    """The first of pydantic's errors (of the body's model) as one a client can act on."""
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return InvalidRequestError(f"the body is not valid JSON: {detail}")
    # loc is ("body", field, ...) from FastAPI, (field, ...) from pydantic: the field path is
    # what a client can act on. Drop the union member tags pydantic adds ("str",
    # "list[int]", "function-after[...]").
    loc = [
        str(part)
        for part in first.get("loc", ())
        if part != "body" and not _UNION_TAG.match(str(part))
    ]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return InvalidRequestError(message, param=param)


def gateway_error_response(
    request: Request, error: GatewayError, headers: dict[str, str] | None = None
) -> JSONResponse:
    if isinstance(error, EngineError):
        logger.error("request %s failed: %s", _request_id(request), error.message)
    return error_response(request.url.path, error, headers)


def _request_id(request: Request) -> str:
    context = request.scope.get("state", {}).get("context")
    return context.request_id if context is not None else "-"


def http_error_response(
    path: str, status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """Starlette's own errors (no route, wrong method), in the style of the path's API."""
    if is_openai_path(path):
        body: dict[str, Any] = {
            "error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": None}
        }  # fmt: skip
    else:
        body = {"error": message, "error_type": "http"}
    return JSONResponse(body, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return gateway_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(request.url.path, exc.status_code, str(exc.detail), exc.headers)
