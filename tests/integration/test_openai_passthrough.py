"""The whole OpenAI API through a live gateway to an upstream that answers as vLLM does
(`tests/recorded_upstream.py`: vLLM's own bodies and streams, recorded): tools, structured
outputs, logprobs, n, tool results and image parts reach it and come back intact, through the
official `openai` client; a cache hit replays each of them as the live reply had them; a
variant that cannot honour a field refuses it by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from app.api.openai import ChatCompletion, Completion
from app.choices import merge_choices
from tests.live_server import live_server
from tests.recorded_upstream import RecordedUpstream, recordings

RECORDED = {r["name"]: r for r in recordings()}


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, RecordedUpstream]]:
    with RecordedUpstream() as upstream:
        replicas = {"replicas": [upstream.url]}
        variants = [
            {"name": "bf16", "backend": "openai", "upstream": replicas},
            # A server that honours less of the API (TGI, llama.cpp) says so in its config.
            {"name": "plain", "backend": "openai",
             "upstream": {**replicas, "unsupported": ["tools", "n", "logprobs"]}},
        ]  # fmt: skip
        with live_server(variants) as url:
            yield url, upstream


@pytest.fixture
def client(gateway: tuple[str, RecordedUpstream]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def _request(name: str) -> dict[str, Any]:
    request = dict(RECORDED[name]["request"])
    request.pop("stream_options", None)
    return request


def _events(sse: str) -> list[dict[str, Any]]:
    data = [line[5:].strip() for line in sse.splitlines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _without_nulls(value: Any) -> Any:
    """A null field and an absent one are the same to a client."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _summary(reply: str, stream: bool) -> Any:
    """What a client gets: a body, or a stream's choices reassembled and its usage counts."""
    if not stream:
        return {**_without_nulls(json.loads(reply)), "id": None}
    events = _events(reply)
    usage = [{k: e["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
             for e in events if e.get("usage")]  # fmt: skip
    choices = merge_choices(e["choices"] for e in events)
    for choice in choices:
        choice.pop("stop_reason", None)  # vLLM's, in its last chunk: not the reply's content
    return sorted(_without_nulls(choices), key=lambda c: c["index"]), usage


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_the_upstreams_reply_comes_back_as_it_wrote_it_and_so_does_a_cache_hit(
    gateway: tuple[str, RecordedUpstream], name: str
) -> None:
    url, _ = gateway
    recorded = RECORDED[name]
    stream = "sse" in recorded
    # Live, past the cache; then live and stored, or a hit on what the same request without
    # `stream` (or with it) stored in another test; then a hit on that.
    replies = [
        httpx.post(url + recorded["endpoint"], json=recorded["request"], timeout=30,
                   headers={"cache-control": cache_control})
        for cache_control in ("no-cache", "", "")
    ]  # fmt: skip
    for reply in replies:
        assert reply.status_code == 200, reply.text
    assert [replies[0].headers["x-cache"], replies[2].headers["x-cache"]] == ["bypass", "hit"]
    expected = _summary(recorded["sse"] if stream else recorded["body_text"], stream)
    # Everything as vLLM wrote it, but the id: ours, the one in our logs and headers.
    assert _summary(replies[0].text, stream) == expected
    if not stream:
        assert replies[0].json()["id"].endswith(replies[0].headers["x-request-id"])
        documented = ChatCompletion if "chat" in recorded["endpoint"] else Completion
        documented.model_validate(replies[0].json())  # as /openapi.json says
    assert _summary(replies[2].text, stream) == _summary(replies[1].text, stream)
    if replies[1].headers["x-cache"] == "miss":
        assert _summary(replies[1].text, stream) == expected


def test_a_streamed_reply_from_the_cache_answers_the_same_request_without_stream(
    gateway: tuple[str, RecordedUpstream],
) -> None:
    """One cache entry, asked both ways: the stream's choices become the body's."""
    url, _ = gateway
    recorded = RECORDED["chat_n3_seed_stream"]
    streamed = httpx.post(url + recorded["endpoint"], json=recorded["request"], timeout=30)
    whole = {k: v for k, v in recorded["request"].items() if k not in ("stream", "stream_options")}
    reply = httpx.post(url + recorded["endpoint"], json=whole, timeout=30)
    assert reply.headers["x-cache"] == "hit"
    choices, _ = _summary(streamed.text, stream=True)
    body = reply.json()
    assert [c["message"]["content"] for c in body["choices"]] == [
        c["delta"]["content"] for c in choices
    ]
    assert [c["finish_reason"] for c in body["choices"]] == [c["finish_reason"] for c in choices]


def test_a_named_tool_call_with_the_official_client(client: openai.OpenAI) -> None:
    request = _request("chat_tool_named")
    (call,) = client.chat.completions.create(**request).choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streamed: the client reassembles the call from its deltas.
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name, call.function.arguments)  # fmt: skip


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    request = _request("chat_json_schema")
    request.pop("response_format")
    parsed = client.chat.completions.parse(**request, response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person)


def test_logprobs_and_their_alternatives(client: openai.OpenAI) -> None:
    request = _request("chat_logprobs")
    logprobs = client.chat.completions.create(**request).choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content
    assert all(len(t.top_logprobs) == request["top_logprobs"] for t in logprobs.content)
    streamed = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed += (
                choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            )
    assert [t.token for t in streamed] == [t.token for t in logprobs.content]


def test_several_choices(client: openai.OpenAI) -> None:
    request = _request("chat_n3_seed")
    reply = client.chat.completions.create(**request)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert sorted(texts) == [0, 1, 2]
    assert all(texts.values())
    assert all(finishes.values())


def test_completions_with_logprobs(client: openai.OpenAI) -> None:
    request = _request("completion_logprobs")
    choice = client.completions.create(**request).choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.tokens
    assert choice.logprobs.top_logprobs
    assert all(len(top) == request["logprobs"] for top in choice.logprobs.top_logprobs)


def test_tool_results_and_image_parts_reach_the_upstream_as_sent(
    gateway: tuple[str, RecordedUpstream], client: openai.OpenAI
) -> None:
    _, upstream = gateway
    messages: list[Any] = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture, and the weather there?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                "detail": "low"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call-1", "content": '{"celsius": 21}'},
    ]  # fmt: skip
    client.chat.completions.create(model="bf16", messages=messages, max_tokens=8)
    assert upstream.received[-1]["messages"] == messages


@pytest.mark.parametrize(
    ("field", "value"),
    [("tools", [{"type": "function", "function": {"name": "f"}}]), ("n", 2), ("logprobs", True)],
)
def test_a_variant_that_cannot_honour_a_field_refuses_it_by_name(
    client: openai.OpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="plain", messages=[{"role": "user", "content": "hi"}], **{field: value}
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == field
    assert "'plain'" in error["message"]
