"""Every endpoint of the ASGI app, on the tiny random-weight model (greedy: deterministic)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.api.openai import ChatCompletion, Completion
from tests.conftest import AppFactory

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
async def client(make_client: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as client:
        yield client


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body strictly: only `data:` lines, each event closed by a blank line."""
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_models_lists_the_variant(client: httpx.AsyncClient) -> None:
    reply = await client.get("/v1/models")
    assert reply.status_code == 200
    assert [m["id"] for m in reply.json()["data"]] == ["tiny"]


async def test_health_ready_ping(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/ping"):
        reply = await client.get(path)
        assert reply.status_code == 200, path


async def test_completion(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 7, **GREEDY},
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str)
    assert choice["text"]
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7
    assert reply.headers["x-request-id"]
    assert reply.headers["x-variant"] == "tiny"


async def test_completion_accepts_token_ids_and_a_list_of_one_prompt(
    client: httpx.AsyncClient,
) -> None:
    for prompt in (["Once upon a time"], [5, 6, 7], [[5, 6, 7]]):
        reply = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}
        )
        assert reply.status_code == 200, (prompt, reply.text)


async def test_streamed_completion_equals_the_whole_one(client: httpx.AsyncClient) -> None:
    request = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 12, **GREEDY}
    whole = (await client.post("/v1/completions", json=request)).json()
    reply = await client.post(
        "/v1/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


async def test_chat_completion_and_stream(client: httpx.AsyncClient) -> None:
    request = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
        "max_completion_tokens": 9,
        **GREEDY,
    }
    whole = await client.post("/v1/chat/completions", json=request)
    assert whole.status_code == 200
    body = whole.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 9

    reply = await client.post("/v1/chat/completions", json={**request, "stream": True})
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[0]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stop_sequence_inside_a_batch(client: httpx.AsyncClient) -> None:
    request = {"model": "tiny", "prompt": "Batching requests", "max_tokens": 30, **GREEDY}
    full = (await client.post("/v1/completions", json=request)).json()["choices"][0]["text"]
    stripped = full.strip()
    assert len(stripped) > 6, full
    stop = stripped[len(stripped) // 2 : len(stripped) // 2 + 3]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        reply = await client.post(
            "/v1/completions", json={**request, "stop": [stop, "never-generated"], "stream": stream}
        )
        if stream:
            chunks = sse_events(reply.text)[:-1]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text = reply.json()["choices"][0]["text"]
            finish = reply.json()["choices"][0]["finish_reason"]
        assert text == expected
        assert stop not in text
        assert finish == "stop"


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi", "x_custom": 1}],
            "max_tokens": 2,
            "metadata": {"trace": "abc"},
            "store": False,
            "parallel_tool_calls": True,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "user": "alice",
            "seed": 7,
        },
    )
    assert reply.status_code == 200, reply.text


async def test_the_local_engine_gives_each_tokens_log_probability(
    client: httpx.AsyncClient,
) -> None:
    """Chat and completions, whole and streamed, and from the cache: one entry per generated
    token, each a log-probability, the tokens' strings spelling the reply (but its tail,
    released at the end); the same numbers every way."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "logprobs": True, "top_logprobs": 0, **GREEDY}  # fmt: skip
    body = (await client.post("/v1/chat/completions", json=chat)).json()
    ChatCompletion.model_validate(body)  # as /openapi.json documents it
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    assert all(e["logprob"] <= 0 and e["top_logprobs"] == [] for e in content)
    assert all(bytes(e["bytes"]).decode() == e["token"] for e in content)
    assert body["choices"][0]["message"]["content"].startswith("".join(e["token"] for e in content))
    hit = await client.post("/v1/chat/completions", json=chat)
    assert hit.headers["x-cache"] == "hit"
    assert hit.json()["choices"] == body["choices"]

    streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True},
                                 headers={"cache-control": "no-cache"})  # fmt: skip
    chunks = [e for e in sse_events(streamed.text)[:-1] if e["choices"]]
    entries = [x for c in chunks if c["choices"][0]["logprobs"]
               for x in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in content])

    completion = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "logprobs": 0,
                  **GREEDY}  # fmt: skip
    whole = (await client.post("/v1/completions", json=completion)).json()
    Completion.model_validate(whole)
    choice = whole["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    pairs = zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    assert logprobs["top_logprobs"] == [{t: lp} for t, lp in pairs]
    assert logprobs["text_offset"][0] == 0
    assert choice["text"].startswith("".join(logprobs["tokens"]))
    # Not asked: not there, and a different cache entry.
    plain = await client.post("/v1/completions", json={**completion, "logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None
    assert plain.headers["x-cache"] != "hit"

    tgi = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3, "details": True}}
    tokens = (await client.post("/generate", json=tgi)).json()["details"]["tokens"]
    assert len(tokens) == 3
    assert all(t["logprob"] <= 0 for t in tokens)


async def test_the_local_engine_gives_several_choices(client: httpx.AsyncClient) -> None:
    """n sequences of one request in one batch: each choice whole, with its own finish (and
    logprobs when asked), usage counting them all; streamed, each choice by its index; a
    cache hit gives the same choices. Greedy choices would all be one: refused, as vLLM."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "n": 3, "temperature": 1.0, "seed": 7, "logprobs": True}  # fmt: skip
    reply = await client.post("/v1/chat/completions", json=chat)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    ChatCompletion.model_validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        assert choice["finish_reason"] == "length"
        assert choice["message"]["role"] == "assistant"
        assert len(choice["logprobs"]["content"]) == 5
    assert body["usage"]["completion_tokens"] == 15
    hit = await client.post("/v1/chat/completions", json=chat)
    assert hit.headers["x-cache"] == "hit"
    assert hit.json()["choices"] == body["choices"]

    completion = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "n": 2,
                  "temperature": 1.0, "stream": True}  # fmt: skip
    events = sse_events((await client.post("/v1/completions", json=completion)).text)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert sorted(texts) == [0, 1]
    assert all(texts.values())
    assert finishes == {0: "length", 1: "length"}

    greedy = await client.post("/v1/chat/completions", json={**chat, "temperature": 0})
    assert greedy.status_code == 400
    assert greedy.json()["error"]["param"] == "n"


async def test_tgi_generate_and_stream_agree(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 8, "details": True}
    whole = await client.post("/generate", json={"inputs": "Once upon", "parameters": params})
    assert whole.status_code == 200
    body = whole.json()
    assert body["details"]["finish_reason"] == "length"
    assert body["details"]["generated_tokens"] == 8
    assert len(body["details"]["tokens"]) == 8

    reply = await client.post(
        "/generate_stream", json={"inputs": "Once upon", "parameters": params}
    )
    events = sse_events(reply.text)
    assert len(events) == 8
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == body["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"
    assert "".join(e["token"]["text"] for e in events) == body["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in body["details"]["tokens"]]


async def test_tgi_return_full_text_and_stop(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/generate",
        json={"inputs": "Once upon", "parameters": {"max_new_tokens": 3, "return_full_text": True}},
    )
    assert reply.json()["generated_text"].startswith("Once upon")


async def test_sagemaker_invocations(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/invocations", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 4}}
    )
    assert reply.status_code == 200
    (item,) = reply.json()
    assert isinstance(item["generated_text"], str)
    streamed = await client.post(
        "/invocations",
        json={"inputs": "Once upon", "parameters": {"max_new_tokens": 4}, "stream": True},
    )
    assert sse_events(streamed.text)[-1]["generated_text"] == item["generated_text"]


async def test_sampling_requests_are_served(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": "Once",
            "max_tokens": 5,
            "temperature": 0.8,
            "top_p": 0.9,
            "top_k": 20,
        },
    )
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] <= 5


async def test_metrics_are_exposed(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    text = (await client.get("/metrics")).text
    assert (
        'model_gateway_requests_total{endpoint="/v1/completions",status="200",variant="tiny"}'
        in text
    )
    assert "model_gateway_time_to_first_token_seconds_bucket" in text
    assert "model_gateway_batch_size_bucket" in text
    assert 'model_gateway_overhead_seconds_count{endpoint="/v1/completions",variant="tiny"}' in text
    assert "process_resident_memory_bytes" in text


async def test_debugging_headers(client: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 3}
    reply = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "my-trace-42"})
    assert reply.headers["x-request-id"] == "my-trace-42"
    assert reply.json()["id"] == "cmpl-my-trace-42"
    queue, ttft, total, overhead = (
        float(reply.headers[h])
        for h in ("x-queue-time", "x-time-to-first-token", "x-total-time", "x-gateway-overhead-ms")
    )
    assert 0 <= queue <= ttft <= total
    assert 0 <= overhead < total  # the engine's time is not the gateway's
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert float(streamed.headers["x-time-to-first-token"]) >= 0
    assert float(streamed.headers["x-gateway-overhead-ms"]) >= 0
    assert "x-total-time" not in streamed.headers  # unknown when the headers leave
    bad_id = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "a b\x01"})
    assert bad_id.headers["x-request-id"] != "a b\x01"


async def test_openapi_schema_lists_every_generation_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    bodies = {
        "/v1/completions": "CompletionRequest",
        "/v1/chat/completions": "ChatCompletionRequest",
        "/generate": "GenerateRequest",
        "/generate_stream": "GenerateRequest",
        "/": "GenerateRequest",
        "/invocations": "GenerateRequest",
    }
    for path, model in bodies.items():
        post = schema["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith("/" + model), (path, body)
    assert "prompt" in schema["components"]["schemas"]["CompletionRequest"]["properties"]
    # A GET is refused in the style of the path's API.
    reply = await client.get("/v1/completions")
    assert reply.status_code == 405
    assert reply.json()["error"]["message"] == "Method Not Allowed"
