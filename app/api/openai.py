"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (on `FastRoute`s),
/v1/models.

Unknown fields are accepted and ignored (clients send extras); known fields this server
cannot honour (n>1, logprobs, tools, penalties...) are refused with a clear 400 rather than
silently dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.types import ASGIApp

from app.api import get_service
from app.api.edge import request_context
from app.api.errors import documented_errors, openai_error_body
from app.api.fast_route import FastRoute
from app.api.fields import INT32_MAX, INT64_MAX, INT64_MIN, PositiveFloat32, TokenCount
from app.api.sse import EVENT_STREAM, Payload, respond
from app.domain import (
    PRIORITY_CLASSES,
    ChatMessage,
    FinishReason,
    GatewayError,
    Generation,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
)

router = APIRouter(prefix="/v1", tags=["openai"])
generation_router = APIRouter(prefix="/v1", tags=["openai"], route_class=FastRoute)

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: TokenCount | None = None
    # Below GREEDY_TEMPERATURE, greedy (as vLLM).
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: Annotated[PositiveFloat32, Field(le=1)] | None = None
    n: int = Field(1, ge=1, le=INT32_MAX)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # vLLM's: a C long
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    # "flex" lowers the request to the batch class; the others keep the key's class (a
    # request may lower its priority, never raise it).
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM's extras that our engines understand. top_k -1 or 0: no limit (at most the
    # vocabulary: the backend checks).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    repetition_penalty: Annotated[PositiveFloat32, Field(le=10)] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for s in sequences:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters")
        return stop

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        if self.n != 1:
            raise ValueError("n must be 1: this server returns one choice per request")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError(
                "presence_penalty and frequency_penalty are not supported; use repetition_penalty"
            )
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def _generation_request(self, max_tokens: int | None, **prompt: Any) -> GenerationRequest:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationRequest(
            model=self.model,
            **prompt,
            max_tokens=max_tokens,
            stop=stop,
            sampling=SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=max(self.top_k or 0, 0),
                repetition_penalty=self.repetition_penalty or 1.0,
                seed=self.seed,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
            ),
            stream=self.stream,
            extra=dict(self.model_extra or {}),
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    logprobs: int | None = Field(None, ge=0, le=0)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list):
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def generation_request(self) -> GenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str | list) else prompt
        if isinstance(prompt, str):
            return self._generation_request(self.max_tokens, prompt=prompt)
        return self._generation_request(self.max_tokens, prompt_token_ids=tuple(prompt))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def chat_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools or self.functions:
            raise ValueError("tools and function calling are not supported by this model")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self

    def generation_request(self) -> GenerationRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequestError(
                "set max_tokens or max_completion_tokens, not both", param="max_tokens"
            )
        return self._generation_request(
            self.max_completion_tokens or self.max_tokens,
            messages=tuple(m.chat_message() for m in self.messages),
        )


# The replies, as documented (built as dicts: a model per reply would cost its validation).
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class _OpenAIShape:
    """Completion and chat completion objects, whole or as stream chunks."""

    def __init__(self, chat: bool, request_id: str, model: str, include_usage: bool) -> None:
        self._chat = chat
        self._id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        self._streamed_chars = 0
        self._token_template: tuple[str, str] | None = None

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }

    @staticmethod
    def _usage(generation: Generation) -> dict[str, int]:
        return {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }

    def body(self, generation: Generation, tokens: list[TokenEvent]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self._chat:
            choice["message"] = {"role": "assistant", "content": generation.text}
        else:
            choice["text"] = generation.text
        choice["finish_reason"] = generation.finish_reason
        return {**self._envelope(self._object, [choice]), "usage": self._usage(generation)}

    def _chunk(self, delta: dict[str, str] | str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self._chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        chunk = self._envelope(self._chunk_object, [choice])
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _delta(self, text: str) -> dict[str, str] | str:
        return ({"content": text} if text else {}) if self._chat else text

    def opening(self) -> list[Payload]:
        return [self._chunk({"role": "assistant", "content": ""}, None)] if self._chat else []

    def _token_chunk(self, text: str) -> str:
        """A token's chunk as JSON text. Streams send one per token, so the envelope is
        serialised once per request and only the text per token."""
        if self._token_template is None:
            marker = "\u0000text\u0000"
            whole = json.dumps(self._chunk(self._delta(marker), None), separators=(",", ":"))
            prefix, suffix = whole.split(json.dumps(marker))
            self._token_template = (prefix, suffix)
        prefix, suffix = self._token_template
        return prefix + json.dumps(text) + suffix

    def chunks(self, event: GenerationEvent) -> list[Payload]:
        if isinstance(event, TokenEvent):
            if not event.text:
                return []
            self._streamed_chars += len(event.text)
            return [self._token_chunk(event.text)]
        tail = event.text[self._streamed_chars :]
        out: list[Payload] = [self._chunk(self._delta(tail), event.finish_reason)]
        if self._include_usage:
            out.append({**self._envelope(self._chunk_object, []), "usage": self._usage(event)})
        return out

    def error(self, error: GatewayError) -> list[Payload]:
        return [openai_error_body(error)]

    def closing(self) -> list[Payload]:
        return ["[DONE]"]


def _responses(reply: type[BaseModel], chunk: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": reply,
            "description": f"the {reply.__name__} object; with `stream: true`, {chunk} objects "
            "as Server-Sent Events, then `data: [DONE]`",
            "content": EVENT_STREAM,
        },
        **documented_errors(openai=True),
    }


async def _serve(
    request: Request, body: _SamplingFields, generation_request: GenerationRequest, chat: bool
) -> ASGIApp:
    context = request_context(request)
    if body.user:  # the sticky A/B key
        context = replace(context, user_key=body.user)
    if body.service_tier == "flex":
        context = context.with_priority(PRIORITY_CLASSES.index("batch"))
    reply = get_service(request).handle(generation_request, context)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shape = _OpenAIShape(chat, context.request_id, body.model, include_usage)
    return await respond(request, reply, shape, stream=body.stream)


@generation_router.post(
    "/completions", response_model=None, responses=_responses(Completion, "text_completion")
)
async def completions(body: CompletionRequest, request: Request) -> ASGIApp:
    return await _serve(request, body, body.generation_request(), chat=False)


@generation_router.post(
    "/chat/completions",
    response_model=None,
    responses=_responses(ChatCompletion, "chat.completion.chunk"),
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ASGIApp:
    return await _serve(request, body, body.generation_request(), chat=True)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "model-gateway"}
            for name in get_service(request).model_names(request_context(request).tenant)
        ],
    }
