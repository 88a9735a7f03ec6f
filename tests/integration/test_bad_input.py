"""The bad-input catalogue: each gets a clear 4xx in the style of the API it came through,
never a 500 and never a hang."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import AppFactory
from tests.tiny_model import CONTEXT_LENGTH

CHAT = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 200  # far past 256 tokens


@pytest.fixture(scope="module")
async def client(make_client: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(max_request_body_bytes=64 * 1024) as client:
        yield client


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": CHAT, **fields}


OPENAI_CASES: list[tuple[str, str, Any, int, str | None]] = [
    # (id, path, body, status, param named in the error)
    ("empty prompt", "/v1/completions", completion(prompt=""), 400, "prompt"),
    ("empty token list", "/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("two prompts", "/v1/completions", completion(prompt=["a", "b"]), 400, "prompt"),
    ("token id out of vocab", "/v1/completions", completion(prompt=[10**6]), 400, "prompt"),
    ("negative token id", "/v1/completions", completion(prompt=[-1]), 400, "prompt"),
    ("prompt over context", "/v1/completions", completion(prompt=LONG_PROMPT), 400, "prompt"),
    ("max_tokens 0", "/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", completion(max_tokens=-5), 400, "max_tokens"),
    (
        "max_tokens past context",
        "/v1/completions",
        completion(max_tokens=CONTEXT_LENGTH),
        400,
        "max_tokens",
    ),
    ("max_tokens huge", "/v1/completions", completion(max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens string", "/v1/completions", completion(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens float", "/v1/completions", completion(max_tokens=1.5), 400, "max_tokens"),
    ("temperature negative", "/v1/completions", completion(temperature=-0.1), 400, "temperature"),
    ("temperature absurd", "/v1/completions", completion(temperature=1e9), 400, "temperature"),
    ("temperature string", "/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("top_p zero", "/v1/completions", completion(top_p=0), 400, "top_p"),
    ("top_p above one", "/v1/completions", completion(top_p=1.5), 400, "top_p"),
    ("n two", "/v1/completions", completion(n=2), 400, None),
    ("five stops", "/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", "/v1/completions", completion(stop=[""]), 400, "stop"),
    ("stop wrong type", "/v1/completions", completion(stop=5), 400, "stop"),
    ("stream not bool", "/v1/completions", completion(stream="yes"), 400, "stream"),
    ("echo", "/v1/completions", completion(echo=True), 400, None),
    ("presence penalty", "/v1/completions", completion(presence_penalty=1.0), 400, None),
    ("logit bias", "/v1/completions", completion(logit_bias={"5": 10}), 400, None),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("unknown model", "/v1/completions", completion(model="gpt-9"), 404, "model"),
    ("body is a list", "/v1/completions", [1, 2], 400, None),
    ("no messages", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    (
        "tool role",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages.0.role",
    ),
    (
        "image part",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages.0.content",
    ),
    ("message not an object", "/v1/chat/completions", chat(messages=["hi"]), 400, "messages.0"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, None),
    ("logprobs", "/v1/chat/completions", chat(logprobs=True), 400, None),
    ("json mode", "/v1/chat/completions", chat(response_format={"type": "json_object"}), 400, None),
    (
        "both max tokens",
        "/v1/chat/completions",
        chat(max_tokens=3, max_completion_tokens=4),
        400,
        "max_tokens",
    ),
    (
        "chat over context",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
        400,
        "messages",
    ),
    (
        "stream_options without stream",
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        None,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in OPENAI_CASES],
    ids=[case[0] for case in OPENAI_CASES],
)
async def test_openai_bad_input(
    client: httpx.AsyncClient, path: str, body: Any, status: int, param: str | None
) -> None:
    for stream in (False, True):
        payload = (
            {**body, "stream": stream}
            if isinstance(body, dict) and "stream" not in body and "stream_options" not in body
            else body
        )
        reply = await client.post(path, json=payload)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b'{"model": "tiny", "prompt": "hi"', b"\xff\xfe", b"null"],
    ids=["broken", "empty", "truncated", "not utf-8", "null"],
)
async def test_openai_invalid_json(client: httpx.AsyncClient, raw: bytes) -> None:
    reply = await client.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"


TGI_CASES: list[tuple[str, Any]] = [
    ("empty inputs", {"inputs": ""}),
    ("missing inputs", {"parameters": {}}),
    ("inputs not a string", {"inputs": ["a"]}),
    ("inputs over context", {"inputs": LONG_PROMPT}),
    ("max_new_tokens 0", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}),
    (
        "max_new_tokens past context",
        {"inputs": "hi", "parameters": {"max_new_tokens": CONTEXT_LENGTH}},
    ),
    ("temperature 0", {"inputs": "hi", "parameters": {"temperature": 0}}),
    ("top_k 0", {"inputs": "hi", "parameters": {"top_k": 0}}),
    ("top_p 0", {"inputs": "hi", "parameters": {"top_p": 0}}),
    ("negative seed", {"inputs": "hi", "parameters": {"seed": -1}}),
    ("repetition_penalty 0", {"inputs": "hi", "parameters": {"repetition_penalty": 0}}),
    ("five stops", {"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
    ("details not bool", {"inputs": "hi", "parameters": {"details": "yes"}}),
    ("parameters not an object", {"inputs": "hi", "parameters": 5}),
    ("truncate", {"inputs": "hi", "parameters": {"truncate": 10}}),
    ("best_of 2", {"inputs": "hi", "parameters": {"best_of": 2}}),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/invocations"])
@pytest.mark.parametrize("body", [c[1] for c in TGI_CASES], ids=[c[0] for c in TGI_CASES])
async def test_tgi_bad_input(client: httpx.AsyncClient, path: str, body: Any) -> None:
    reply = await client.post(path, json=body)
    assert reply.status_code == 422, reply.text
    error = reply.json()
    assert error["error"]
    assert error["error_type"] == "validation"


async def test_tgi_invalid_json(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/generate", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert reply.json()["error_type"] == "validation"


async def test_oversized_body_is_refused(client: httpx.AsyncClient) -> None:
    big = {"model": "tiny", "prompt": "x" * (128 * 1024)}
    reply = await client.post("/v1/completions", json=big)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    assert reply.headers["x-request-id"]  # answered before the app, still traceable
    reply = await client.post("/generate", json={"inputs": "x" * (128 * 1024)})
    assert reply.status_code == 413
    assert reply.json()["error_type"] == "validation"


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/embeddings", json={})
    assert reply.status_code == 404
    assert "message" in reply.json()["error"]
    reply = await client.get("/v1/completions")
    assert reply.status_code == 405


async def test_known_extras_the_engine_cannot_honour_are_refused(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post("/v1/completions", json=completion(min_tokens=5))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "min_tokens"
