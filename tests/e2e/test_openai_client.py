"""The real default model behind a live server, called with the official `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.tenancy.keys import hash_secret
from tests.live_server import live_server

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"  # the model ended its turn with <|im_end|>
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 37  # the chat template, as transformers renders it


def test_streaming_chat_answers_paris(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert "Paris" in text
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens > 0


def test_completion_and_stream_agree(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert whole.choices[0].text == streamed
    assert whole.choices[0].finish_reason == "length"


def test_bad_request_is_an_openai_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)  # type: ignore[arg-type]
    assert error.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]


def test_tgi_generate(server: str) -> None:
    reply = httpx.post(
        server + "/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}},
        timeout=60,
    )
    assert reply.status_code == 200
    assert "Paris" in reply.json()["generated_text"]


def test_ignore_eos_generates_exactly_max_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 24
    assert reply.choices[0].finish_reason == "length"


def test_key_errors_are_the_clients_own_exceptions(default_model: Path) -> None:
    """401, 403 and 429 reach the `openai` client as AuthenticationError,
    PermissionDeniedError and RateLimitError, with the headers it reads."""
    keys = [
        {"name": "one-a-minute", "sha256": hash_secret("mg-one"),
         "limits": {"requests_per_minute": 1}},
        {"name": "no-models", "sha256": hash_secret("mg-none"), "models": []},
    ]  # fmt: skip
    with live_server(auth="required", keys=json.dumps(keys)) as url:

        def ask(secret: str) -> Any:
            with openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0) as client:
                return client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=QUESTION, max_tokens=2,  # type: ignore[arg-type]
                )  # fmt: skip

        with pytest.raises(openai.AuthenticationError) as unknown:
            ask("mg-wrong")
        assert unknown.value.code == "invalid_api_key"
        with pytest.raises(openai.PermissionDeniedError):
            ask("mg-none")
        first = ask("mg-one")
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as limited:
            ask("mg-one")
        headers = limited.value.response.headers
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert int(headers["retry-after"]) >= 1
