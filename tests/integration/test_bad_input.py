"""The bad-input catalogue: each gets a clear 4xx in the style of the API it came through,
never a 500 and never a hang."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import AppFactory
from tests.tiny_model import CONTEXT_LENGTH

CHAT = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
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
    ("n two, greedy", "/v1/completions", completion(n=2, temperature=0), 400, "n"),
    ("n zero", "/v1/completions", completion(n=0), 400, "n"),
    ("n above the batch size", "/v1/completions", completion(n=33), 400, "n"),
    ("n past OpenAI's limit", "/v1/completions", completion(n=129), 400, "n"),
    ("best_of below n", "/v1/completions", completion(n=3, best_of=2), 400, None),
    ("logprobs past 20", "/v1/completions", completion(logprobs=21), 400, "logprobs"),
    (
        "alternatives on the local engine",
        "/v1/completions",
        completion(logprobs=1),
        400,
        "logprobs",
    ),
    ("five stops", "/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", "/v1/completions", completion(stop=[""]), 400, "stop"),
    ("stop wrong type", "/v1/completions", completion(stop=5), 400, "stop"),
    ("stream not bool", "/v1/completions", completion(stream="yes"), 400, "stream"),
    ("echo", "/v1/completions", completion(echo=True), 400, "echo"),
    (
        "presence penalty",
        "/v1/completions",
        completion(presence_penalty=1.0),
        400,
        "presence_penalty",
    ),
    (
        "presence penalty past 2",
        "/v1/completions",
        completion(presence_penalty=2.5),
        400,
        "presence_penalty",
    ),
    ("logit bias", "/v1/completions", completion(logit_bias={"5": 10}), 400, "logit_bias"),
    ("logit bias not a token id", "/v1/completions", completion(logit_bias={"x": 1}), 400, None),
    ("logit bias past 100", "/v1/completions", completion(logit_bias={"5": 101}), 400, None),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("unknown model", "/v1/completions", completion(model="gpt-9"), 404, "model"),
    ("body is a list", "/v1/completions", [1, 2], 400, None),
    ("no messages", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    (
        "unknown role",
        "/v1/chat/completions",
        chat(messages=[{"role": "robot"}]),
        400,
        "messages.0.role",
    ),
    (
        "tool result without its call id",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages.0",
    ),
    (
        "image part on the local engine",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages.0.content",
    ),
    (
        "image part without its image",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages.0.content",
    ),
    (
        "text part without text",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "messages.0.content",
    ),
    ("message not an object", "/v1/chat/completions", chat(messages=["hi"]), 400, "messages.0"),
    (
        "tool without function",
        "/v1/chat/completions",
        chat(tools=[{"type": "function"}]),
        400,
        "tools.0.function",
    ),
    ("tools on the local engine", "/v1/chat/completions", chat(tools=[TOOL]), 400, "tools"),
    (
        "tool_choice naming no tool",
        "/v1/chat/completions",
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        400,
        None,
    ),
    ("tool_choice without tools", "/v1/chat/completions", chat(tool_choice="required"), 400, None),
    (
        "alternatives on the local engine",
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=2),
        400,
        "top_logprobs",
    ),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=2), 400, None),
    (
        "top_logprobs past 20",
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
    ),
    (
        "json mode on the local engine",
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}),
        400,
        "response_format",
    ),
    (
        "json_schema without its schema",
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format",
    ),
    (
        "unknown response format",
        "/v1/chat/completions",
        chat(response_format={"type": "yaml"}),
        400,
        "response_format.type",
    ),
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
    # Fine as Python numbers, not in the engine's terms (float32, C integers, the vocabulary).
    ("top_k past the vocabulary", "/v1/completions", completion(top_k=385), 400, "top_k"),
    ("top_k past 2**64", "/v1/completions", completion(top_k=2**64), 400, "top_k"),
    ("top_k past int32", "/v1/chat/completions", chat(top_k=2**31), 400, "top_k"),
    (
        "repetition_penalty 0 in float32",
        "/v1/completions",
        completion(repetition_penalty=1e-46),
        400,
        "repetition_penalty",
    ),
    (
        "repetition_penalty the least double",
        "/v1/chat/completions",
        chat(repetition_penalty=5e-324),
        400,
        "repetition_penalty",
    ),
    (
        "top_p 0 in float32",
        "/v1/completions",
        completion(top_p=1e-46, temperature=0.7),
        400,
        "top_p",
    ),
    (
        "top_p the least double",
        "/v1/chat/completions",
        chat(top_p=5e-324, temperature=0.7),
        400,
        "top_p",
    ),
    ("seed past int64", "/v1/completions", completion(seed=2**63), 400, "seed"),
    ("max_tokens past int32", "/v1/completions", completion(max_tokens=2**31), 400, "max_tokens"),
    ("min_tokens past int32", "/v1/completions", completion(min_tokens=2**31), 400, "min_tokens"),
    (
        "max_completion_tokens past int32",
        "/v1/chat/completions",
        chat(max_completion_tokens=2**64),
        400,
        "max_completion_tokens",
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
    ("top_k past the vocabulary", {"inputs": "hi", "parameters": {"top_k": 385}}),
    ("top_k past 2**64", {"inputs": "hi", "parameters": {"top_k": 2**64}}),
    ("temperature 0 in float32", {"inputs": "hi", "parameters": {"temperature": 1e-46}}),
    ("top_p 0 in float32", {"inputs": "hi", "parameters": {"top_p": 1e-46}}),
    ("top_p the least double", {"inputs": "hi", "parameters": {"top_p": 5e-324}}),
    (
        "repetition_penalty 0 in float32",
        {"inputs": "hi", "parameters": {"repetition_penalty": 1e-300}},
    ),
    ("seed past uint64", {"inputs": "hi", "parameters": {"seed": 2**64}}),
    ("max_new_tokens past int32", {"inputs": "hi", "parameters": {"max_new_tokens": 2**31}}),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/invocations"])
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


async def test_a_chunked_body_over_the_limit_is_refused(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * 16 * 1024
        yield b'"}'

    for path in ("/v1/completions", "/generate"):
        reply = await client.post(path, content=chunks())
        assert reply.status_code == 413, reply.text
        assert reply.headers["connection"] == "close"
    assert reply.json()["error_type"] == "validation"


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
async def test_a_body_declared_as_something_else_than_json(
    client: httpx.AsyncClient, path: str
) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "inputs": "hi", "max_tokens": 2,
                       "parameters": {"max_new_tokens": 2}}).encode()  # fmt: skip
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        reply = await client.post(path, content=body, headers={"content-type": content_type})
        assert reply.status_code == 415, reply.text
        message = reply.json()["error"]
        assert "application/json" in (message if isinstance(message, str) else message["message"])
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        reply = await client.post(path, content=body, headers={"content-type": content_type})
        assert reply.status_code == 200, reply.text
    bare = await client.post(path, content=body)  # none declared: read as JSON
    assert bare.status_code == 200, bare.text


async def test_a_temperature_too_small_for_float32_decodes_greedily(
    client: httpx.AsyncClient,
) -> None:
    uncached = {"Cache-Control": "no-cache, no-store"}  # each one generated
    greedy = await client.post(
        "/v1/completions", json=completion(temperature=0, max_tokens=8), headers=uncached
    )
    for tiny in (1e-40, 1e-46, 5e-324):
        reply = await client.post(
            "/v1/completions", json=completion(temperature=tiny, max_tokens=8), headers=uncached
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"] == greedy.json()["choices"]


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
