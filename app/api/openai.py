"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (on `FastRoute`s),
/v1/models.

Every field OpenAI defines is checked for shape here (a 400 in OpenAI's format); whether
the variant can honour it (tools, response_format, logprobs, n, penalties...) is its
backend's call: an upstream server gets them all, the local engine refuses those it has no
mechanism for, by name. Unknown fields are accepted and passed to upstream servers.
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
from app.choices import (
    body_choices,
    is_plain_body,
    logprobs_object,
    merge_choices,
    stream_choice,
    stream_choices,
)
from app.domain import (
    PRIORITY_CLASSES,
    ChatMessage,
    GatewayError,
    Generation,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
)
from app.settings import OPTION_NAMES

router = APIRouter(prefix="/v1", tags=["openai"])
generation_router = APIRouter(prefix="/v1", tags=["openai"], route_class=FastRoute)

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_CHOICES = 128  # n and best_of, as OpenAI's API
MAX_LOGPROBS = 20  # top_logprobs and completions' logprobs, as OpenAI's (and vLLM's default)
MAX_TOOLS = 128
MAX_NAME = 64  # a function's or a participant's name

# The values of the option fields (`GenerationRequest.options`) that mean "not asked for".
_OPTION_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
    "logprobs": (False,), "echo": (False,), "suffix": ("",), "tools": ([],),
    "functions": ([],), "response_format": ({"type": "text"},), "parallel_tool_calls": (True,),
    "tool_choice": ("none",), "function_call": ("none",), "top_logprobs": (0,),
}  # fmt: skip


def _is_default(name: str, value: Any) -> bool:
    # By type too: a completion's `logprobs: 0` asks for something, `False` does not.
    return any(type(value) is type(d) and value == d for d in _OPTION_DEFAULTS.get(name, ()))


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
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # vLLM's: a C long
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    # "flex" lowers the request to the batch class; the others keep the key's class (a
    # request may lower its priority, never raise it).
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    # vLLM's extras that our engines understand. top_k -1 or 0: no limit (at most the
    # vocabulary: the backend checks).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    repetition_penalty: Annotated[PositiveFloat32, Field(le=10)] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    # Options (OptionName; those of chat or completions alone are on their models): checked
    # for shape here; a backend that cannot honour one refuses it by name.
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = None  # fmt: skip

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
    def _check_stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def options(self) -> dict[str, Any]:
        """The option fields set to other than their default, as the client sent them."""
        names = OPTION_NAMES.intersection(self.model_fields_set)
        if not names:  # the common request: no dump at all
            return {}
        values = self.model_dump(include=set(names), exclude_unset=True, by_alias=True)
        return {k: v for k, v in values.items() if v is not None and not _is_default(k, v)}

    def _generation_request(self, max_tokens: int | None, **prompt: Any) -> GenerationRequest:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        options = self.options()
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
            options=options,
            logprobs="logprobs" in options,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list):
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        return self

    def generation_request(self) -> GenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if isinstance(prompt[0], str | list) else prompt
        if isinstance(prompt, str):
            return self._generation_request(self.max_tokens, prompt=prompt)
        return self._generation_request(self.max_tokens, prompt_token_ids=tuple(prompt))


class ContentPart(BaseModel):
    """A part of a message's content: text, or what the model behind may read (image_url,
    input_audio, file...), passed on as sent."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(min_length=1, max_length=64)
    text: str | None = None

    @model_validator(mode="after")
    def _check_part(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type in ("image_url", "input_audio", "file") and not isinstance(
            (self.model_extra or {}).get(self.type), dict
        ):
            raise ValueError(f"a {self.type} part needs an object `{self.type}`")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=MAX_NAME)
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check_role(self) -> Message:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the `tool_call_id` it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def chat_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            content = "".join(part.text or "" for part in self.content if part.type == "text")
        else:
            content = self.content or ""
        role = "system" if self.role == "developer" else self.role
        plain = isinstance(self.content, str | None) and not (
            self.name or self.tool_calls or self.tool_call_id or self.model_extra
        )
        # Upstreams get `developer` as `system` too: not every server knows the newer name.
        raw = None if plain else {**self.model_dump(exclude_unset=True), "role": role}
        return ChatMessage(role=role, content=content, raw=raw)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class _Named(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=MAX_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: _Named


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | _Named | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            named = self.tool_choice.function.name
            if named not in {t.function.name for t in self.tools or []}:
                raise ValueError(f"tool_choice names {named!r}, which is not in tools")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools")
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
# Bodies relayed from an upstream server keep its other fields too (vLLM's `stop_reason`,
# `prompt_logprobs`, usage details...): the models document what every reply holds.
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # empty from the local engine: it has no alternatives


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


# "stop" or "length"; from an upstream server also its own ("tool_calls"...).
FinishReasonOut = Annotated[str | None, Field(examples=["stop", "length", "tool_calls"])]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None  # with `logprobs` asked
    finish_reason: FinishReasonOut


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the reply is tool calls alone
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None  # with `logprobs: true`
    finish_reason: FinishReasonOut


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class _OpenAIShape:
    """Completion and chat completion objects, whole or as stream chunks."""

    def __init__(
        self, chat: bool, request_id: str, model: str, include_usage: bool, logprobs: bool
    ) -> None:
        self._chat = chat
        self._id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        # Shaped here from the engine's token log-probabilities (CTranslate2); an upstream's
        # come inside its own choices.
        self._logprobs = logprobs
        self._streamed_chars = 0  # of choice 0's text
        self._finished = False  # choice 0's finish was relayed
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
        if generation.body is not None:  # the upstream's, but for the fields we own
            return {**generation.body, "id": self._id, "model": self._model}
        if any(t.choices is not None for t in tokens):  # a stream's, reassembled (cache)
            merged = merge_choices(
                t.choices or [stream_choice(0, t.text, self._chat)] for t in tokens
            )
            choices = body_choices(merged, self._chat)
            return {**self._envelope(self._object, choices), "usage": self._usage(generation)}
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs_of(tokens, 0)}
        if self._chat:
            choice["message"] = {"role": "assistant", "content": generation.text}
        else:
            choice["text"] = generation.text
        choice["finish_reason"] = generation.finish_reason
        return {**self._envelope(self._object, [choice]), "usage": self._usage(generation)}

    def _logprobs_of(self, tokens: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        """The logprobs object of `tokens`, whose text starts at character `offset` of the
        reply. A token's string is the text it released: the strings add up to the reply (a
        token whose text is held back, for a stop sequence or a character's other bytes, has
        an empty one, and the tail released at the end has none)."""
        pairs = [(t.text, t.logprob) for t in tokens if t.logprob is not None]
        if not self._logprobs or not pairs:
            return None
        return logprobs_object(pairs, offset, self._chat)

    def _chunk(self, delta: dict[str, str] | str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self._chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return self._choices_chunk([choice])

    def _choices_chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._envelope(self._chunk_object, choices)
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
            self._streamed_chars += len(event.text)
            if event.choices is not None:  # the upstream's choices, whole
                self._finished = self._finished or any(
                    c.get("index", 0) == 0 and c.get("finish_reason") for c in event.choices
                )
                return [self._choices_chunk(list(event.choices))]
            if self._logprobs and event.logprob is not None:
                chunk = self._chunk(self._delta(event.text), None)
                offset = self._streamed_chars - len(event.text)
                chunk["choices"][0]["logprobs"] = self._logprobs_of([event], offset)
                return [chunk]
            return [self._token_chunk(event.text)] if event.text else []
        out: list[Payload] = []
        body = event.body
        if (
            body is not None
            and not self._streamed_chars
            and not is_plain_body(body["choices"], self._chat)
        ):  # a body from the cache, its choices as one chunk
            out.append(self._choices_chunk(stream_choices(body["choices"], self._chat)))
        elif not self._finished:
            tail = event.text[self._streamed_chars :]
            out.append(self._chunk(self._delta(tail), event.finish_reason))
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
    logprobs = generation_request.logprobs
    shape = _OpenAIShape(chat, context.request_id, body.model, include_usage, logprobs)
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
