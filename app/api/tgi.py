"""TGI-compatible routes (`/generate`, `/generate_stream`, and `/`, TGI's compat route where
its official clients post) and the SageMaker container contract (`/invocations`, answered
like `/`; `/ping` lives in health.py), on `FastRoute`s.

TGI serves one model: these routes use the first configured model.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.types import ASGIApp

from app.api import get_service
from app.api.edge import request_context
from app.api.errors import documented_errors, tgi_error_body
from app.api.fast_route import FastRoute
from app.api.fields import INT32_MAX, UINT64_MAX, PositiveFloat32, TokenCount
from app.api.sse import EVENT_STREAM, Payload, respond
from app.domain import (
    GatewayError,
    Generation,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    StopCause,
    TokenEvent,
)

router = APIRouter(route_class=FastRoute)

MAX_STOP_SEQUENCES = 4


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    max_new_tokens: TokenCount | None = None
    # Strictly positive, as TGI's; below GREEDY_TEMPERATURE, greedy.
    temperature: Annotated[PositiveFloat32, Field(le=100)] | None = None
    top_p: Annotated[PositiveFloat32, Field(le=1)] | None = None
    top_k: int | None = Field(None, gt=0, le=INT32_MAX)  # at most the vocabulary: checked
    repetition_penalty: Annotated[PositiveFloat32, Field(le=10)] | None = None
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)  # TGI's: a u64
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    details: bool = False
    return_full_text: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    truncate: int | None = Field(None, le=INT32_MAX)
    typical_p: float | None = None
    watermark: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    grammar: Any = None

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must not be empty")
        return stop

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> Parameters:
        unsupported = [
            name
            for name in ("truncate", "typical_p", "watermark", "decoder_input_details",
                         "top_n_tokens", "grammar")
            if getattr(self, name)
        ]  # fmt: skip
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
        return self

    def sampling(self) -> SamplingParams:
        # As TGI: any sampling parameter turns sampling on, even without do_sample.
        sampled = self.do_sample or any(
            v is not None for v in (self.temperature, self.top_p, self.top_k)
        )
        return SamplingParams(
            temperature=(self.temperature or 1.0) if sampled else 0.0,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
        )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # read by / and /invocations only

    def generation_request(self, model: str, stream: bool) -> GenerationRequest:
        p = self.parameters
        return GenerationRequest(
            model=model,
            prompt=self.inputs,
            max_tokens=p.max_new_tokens,
            stop=tuple(p.stop),
            sampling=p.sampling(),
            stream=stream,
            logprobs=p.details,
        )


# The replies, as documented (built as dicts: a model per reply would cost its validation).
class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class Details(BaseModel):
    finish_reason: StopCause
    generated_tokens: int
    seed: int | None
    prefill: list[Token]
    tokens: list[Token]


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None  # with `parameters.details`


class _TGIShape:
    """TGI's GenerateResponse, or its stream of token events. A stream's last event carries
    the last token with `generated_text` and `details`, so token events are sent one late."""

    def __init__(self, body: GenerateRequest, as_list: bool) -> None:
        self._prefix = body.inputs if body.parameters.return_full_text else ""
        self._details = body.parameters.details
        self._seed = body.parameters.seed
        self._as_list = as_list
        self._held: TokenEvent | None = None
        self._index = 0
        self._streamed_chars = 0

    def _details_of(self, generation: Generation) -> dict[str, Any]:
        return {
            "finish_reason": generation.stop_cause,
            "generated_tokens": generation.completion_tokens,
            "seed": self._seed,
        }

    @staticmethod
    def _token(event: TokenEvent) -> dict[str, Any]:
        return {"id": event.token_id, "text": event.text, "logprob": event.logprob,
                "special": False}  # fmt: skip

    def body(self, generation: Generation, tokens: list[TokenEvent]) -> Any:
        reply: dict[str, Any] = {"generated_text": self._prefix + generation.text}
        if self._details:
            reply["details"] = {
                **self._details_of(generation),
                "prefill": [],
                "tokens": [self._token(t) for t in tokens],
            }
        return [reply] if self._as_list else reply

    def opening(self) -> list[Payload]:
        return []

    def _event(self, token: dict[str, Any], generation: Generation | None) -> dict[str, Any]:
        self._index += 1
        return {
            "index": self._index,
            "token": token,
            "top_tokens": None,
            "generated_text": None if generation is None else self._prefix + generation.text,
            "details": None if generation is None else self._details_of(generation),
        }

    def chunks(self, event: GenerationEvent) -> list[Payload]:
        out: list[Payload] = []
        if isinstance(event, TokenEvent):
            if self._held is not None:
                out.append(self._event(self._token(self._held), None))
            self._streamed_chars += len(event.text)
            self._held = event
            return out
        tail = event.text[self._streamed_chars :]
        if self._held is None:  # ended before any token: report an empty special token
            token = {"id": 0, "text": tail, "logprob": None, "special": True}
        else:
            token = {**self._token(self._held), "text": self._held.text + tail}
        out.append(self._event(token, event))
        return out

    def error(self, error: GatewayError) -> list[Payload]:
        return [tgi_error_body(error)]

    def closing(self) -> list[Payload]:
        return []


def _responses(reply: Any, what: str) -> dict[int | str, dict[str, Any]]:
    stream = (
        "TGI's token events as Server-Sent Events, the last with `generated_text` and `details`"
    )
    return {
        200: {"model": reply, "description": what.format(stream=stream), "content": EVENT_STREAM},
        **documented_errors(openai=False),
    }


async def _generate(
    request: Request, body: GenerateRequest, *, stream: bool, as_list: bool = False
) -> ASGIApp:
    service = get_service(request)
    reply = service.handle(
        body.generation_request(service.default_model(), stream), request_context(request)
    )
    return await respond(request, reply, _TGIShape(body, as_list), stream=stream)


@router.post(
    "/generate",
    tags=["tgi"],
    response_model=None,
    responses=_responses(GenerateResponse, "the generated text"),
)
async def generate(body: GenerateRequest, request: Request) -> ASGIApp:
    return await _generate(request, body, stream=False)


@router.post(
    "/generate_stream",
    tags=["tgi"],
    response_model=None,
    responses=_responses(GenerateResponse, "{stream}"),
)
async def generate_stream(body: GenerateRequest, request: Request) -> ASGIApp:
    return await _generate(request, body, stream=True)


_COMPAT = "a list of one generated text; with `stream: true`, {stream}"


@router.post(
    "/", tags=["tgi"], response_model=None, responses=_responses(list[GenerateResponse], _COMPAT)
)
async def compat_generate(body: GenerateRequest, request: Request) -> ASGIApp:
    """TGI's own route for its clients (`text-generation`, `huggingface_hub`)."""
    return await _generate(request, body, stream=body.stream, as_list=True)


@router.post(
    "/invocations",
    tags=["sagemaker"],
    response_model=None,
    responses=_responses(list[GenerateResponse], _COMPAT),
)
async def invocations(body: GenerateRequest, request: Request) -> ASGIApp:
    return await _generate(request, body, stream=body.stream, as_list=True)
