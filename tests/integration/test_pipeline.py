"""The request pipeline's shape: the generation routes are FastAPI routes whose documented
responses are the ones served; FastAPI's exception handlers reach them; a route declaring
what their fast path skips is refused; every request, coalesced ones too, gets its own
timings; TGI's root route answers as TGI's does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.api.errors import OpenAIErrorResponse, TGIErrorResponse
from app.api.fast_route import FastRoute
from app.domain import ModelNotFoundError
from app.main import create_app
from app.settings import Settings, VariantSettings
from tests.conftest import SHUTDOWN_TIMEOUT_S, AppFactory
from tests.integration.test_api import sse_events
from tests.integration.test_cache import metric
from tests.live_server import eventually

OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
TGI_ROUTES = ("/generate", "/generate_stream", "/", "/invocations")


@pytest.fixture(scope="module")
async def client(make_client: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as client:
        yield client


def _error_model(operation: dict[str, Any], status: str) -> str:
    schema = operation["responses"][status]["content"]["application/json"]["schema"]
    return str(schema["$ref"]).rsplit("/", 1)[-1]


async def test_generation_routes_document_the_replies_they_give(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in OPENAI_ROUTES + TGI_ROUTES:
        operation = schema["paths"][path]["post"]
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }, path
        openai = path in OPENAI_ROUTES
        expected = ["400", "404"] if openai else ["422"]
        for status in [*expected, "401", "403", "413", "429", "504", "default"]:
            model = _error_model(operation, status)
            assert model == ("OpenAIErrorResponse" if openai else "TGIErrorResponse"), (
                path,
                status,
            )
        assert "Retry-After" in operation["responses"]["429"]["headers"]
        assert "HTTPValidationError" not in str(operation), path
        assert ("422" in operation["responses"]) is not openai, path

    # What is served matches what is documented.
    bad = {"model": "tiny", "prompt": "x", "max_tokens": 0}
    reply = await client.post("/v1/completions", json=bad)
    assert reply.status_code == 400
    OpenAIErrorResponse.model_validate(reply.json())
    unknown = await client.post("/v1/completions", json={**bad, "model": "nope", "max_tokens": 1})
    assert unknown.status_code == 404
    OpenAIErrorResponse.model_validate(unknown.json())
    for path in TGI_ROUTES:
        reply = await client.post(path, json={"inputs": ""})
        assert reply.status_code == 422, path
        TGIErrorResponse.model_validate(reply.json())


async def test_exception_handlers_reach_the_generation_routes(tiny_model_dir: Path) -> None:
    app = create_app(
        Settings(variants=[VariantSettings(name="tiny", model_path=tiny_model_dir)], auth="off")
    )

    async def teapot(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled": str(exc)}, status_code=418)

    app.add_exception_handler(ModelNotFoundError, teapot)  # the FastAPI way
    async with (
        LifespanManager(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        chat = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        for path, body in (("/v1/completions", {"model": "nope", "prompt": "x"}),
                           ("/v1/chat/completions", chat)):  # fmt: skip
            reply = await client.post(path, json=body)
            assert reply.status_code == 418, path
            assert "nope" in reply.json()["handled"]


class Body(BaseModel):
    x: int


async def _endpoint(body: Body, request: Request) -> JSONResponse:
    return JSONResponse({"x": body.x})


async def _dependency() -> None:
    pass


async def _with_query(body: Body, request: Request, q: int = 0) -> JSONResponse:
    return JSONResponse({})


def test_a_fast_route_refuses_what_it_would_skip() -> None:
    router = APIRouter(route_class=FastRoute)
    with pytest.raises(TypeError, match="dependencies"):
        router.add_api_route("/a", _endpoint, methods=["POST"], response_model=None,
                             dependencies=[Depends(_dependency)])  # fmt: skip
    with pytest.raises(TypeError, match="parameters"):
        router.add_api_route("/b", _with_query, methods=["POST"], response_model=None)
    router.add_api_route("/c", _endpoint, methods=["POST"], response_model=None)
    for app in (FastAPI(), FastAPI(dependencies=[Depends(_dependency)])):
        app.include_router(router, dependencies=[Depends(_dependency)])
        with pytest.raises(TypeError, match="dependencies"):
            app.openapi()  # what create_app does once everything is included


def test_create_app_checks_its_routes_at_once(tiny_model_dir: Path) -> None:
    settings = Settings(
        variants=[VariantSettings(name="tiny", model_path=tiny_model_dir)], auth="off"
    )
    assert "/v1/completions" in create_app(settings).openapi_schema["paths"]  # type: ignore[index]


async def test_coalesced_requests_each_get_their_own_timings(make_client: AppFactory) -> None:
    # A lone request waits a whole second for its batch: long enough for a second to join.
    batching = {"max_wait_ms": 1000, "arrival_gap_ms": 1000}
    async with make_client(variant={"batching": batching}) as client:
        body = {"model": "tiny", "prompt": "Alike", "max_tokens": 4, "temperature": 0}
        first = asyncio.create_task(client.post("/v1/completions", json=body))

        async def queued() -> bool:
            return await metric(client, "model_gateway_queue_depth") == 1

        await eventually(queued, 10, "the first request queued")
        second = await client.post("/v1/completions", json=body)
        first_reply = await first
        assert await metric(client, "model_gateway_cache_coalesced_total") == 1
        for reply in (first_reply, second):
            assert reply.headers["x-cache"] == "miss"
            queue = float(reply.headers["x-queue-time"])
            assert 0 <= queue <= float(reply.headers["x-time-to-first-token"])
        # The second came later to the same batch: it waited less.
        assert float(second.headers["x-queue-time"]) < float(first_reply.headers["x-queue-time"])
        assert second.json()["choices"] == first_reply.json()["choices"]


async def test_tgi_root_route(client: httpx.AsyncClient) -> None:
    body = {"inputs": "Once upon", "parameters": {"max_new_tokens": 4, "details": True}}
    whole = await client.post("/", json=body)
    assert whole.status_code == 200
    (item,) = whole.json()  # as TGI: a list of one
    assert item["details"]["generated_tokens"] == 4
    assert whole.headers["x-variant"] == "tiny"
    streamed = await client.post("/", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1]["generated_text"] == item["generated_text"]
    assert [e["token"]["text"] for e in events] == [t["text"] for t in item["details"]["tokens"]]
    assert (await client.get("/")).status_code == 405
