"""The types every layer below the API speaks, and the domain errors.

Wire schemas (pydantic) live with their API in `app/api/`; below it everything is a
dataclass. Going down: a `RequestContext` (who asks, by when) and a `GenerationRequest`
(what to generate). Coming up: `BackendEvent`s, which the service turns into a `Reply`.
Domain errors carry no HTTP status: `app/api/errors.py` is the one place that maps them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
# Why a sequence ended, finer than OpenAI's finish_reason (TGI reports this).
StopCause = Literal["eos_token", "stop_sequence", "length"]
# error: the lookup failed (the cache is down or held an unusable value); generated.
CacheResult = Literal["hit", "miss", "error", "bypass"]


@dataclass(frozen=True)
class CacheControl:
    no_cache: bool = False  # do not answer from the cache
    no_store: bool = False  # do not store the answer


@dataclass(frozen=True)
class RequestContext:
    """Set once per request by the edge; read by everything below it."""

    request_id: str
    arrived_at: float  # time.monotonic()
    deadline: float  # time.monotonic()
    cache_control: CacheControl = CacheControl()
    # The sticky A/B key: the OpenAI `user` field (the adapter puts it here), else the header
    # X-User-Id, else the bearer token.
    user_key: str | None = None
    forced_variant: str | None = None  # header X-Variant


# Below this temperature sampling is greedy, as in vLLM: dividing logits by less overflows
# float32 (1e-40 made CTranslate2 emit token 0 every step).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate until max_tokens (benchmarks)
    min_tokens: int = 0  # vLLM's: no end of sequence before this many tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


# A prompt this long (in characters; a token id counts as 8) is prepared off the event
# loop: tokenizing it would hold every other request up for milliseconds or more.
LONG_PROMPT_CHARS = 4096


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of `prompt`, `prompt_token_ids`, `messages` is set."""

    model: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None  # None: the variant's default, capped by the context
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    # False when the client wants one body: an upstream server may then answer in one too.
    stream: bool = True
    # Fields of the client's request this server does not know: forwarded to upstream
    # servers (vLLM's other sampling extras), ignored by local engines.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def long_prompt(self) -> bool:
        """Long enough to be prepared off the event loop (LONG_PROMPT_CHARS)."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages) >= LONG_PROMPT_CHARS
        if self.prompt_token_ids is not None:
            return 8 * len(self.prompt_token_ids) >= LONG_PROMPT_CHARS
        return len(self.prompt or "") >= LONG_PROMPT_CHARS


@dataclass(frozen=True)
class PreparedRequest:
    """A request its backend has checked and resolved: the prompt as the model sees it and
    the token budget. Everything that determines the output is here (the cache key)."""

    request: GenerationRequest
    # Token ids where the backend tokenizes; for an upstream server, the prompt as sent to
    # it (the text, or the chat messages as JSON).
    prompt: list[int] | str
    max_tokens: int
    # The client's unknown fields that this backend passes on (upstream servers), and that
    # may therefore change the output; empty where the backend ignores them.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (may be empty: held back for a
    multi-byte character or a possible stop sequence)."""

    token_id: int
    text: str
    logprob: float | None


@dataclass(frozen=True)
class Generation:
    """The final event of every successful generation."""

    text: str
    finish_reason: FinishReason
    stop_cause: StopCause
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Scheduled:
    """The engine started the generation (its batch began) at `at`, time.monotonic()."""

    at: float


@dataclass(frozen=True)
class CacheLookup:
    """How the cache layer answered; before any token."""

    result: CacheResult


# What an API shapes into a reply: tokens, then one Generation.
GenerationEvent = TokenEvent | Generation
# What a backend yields; the service keeps the first two for the reply's timings.
BackendEvent = Scheduled | CacheLookup | TokenEvent | Generation


@dataclass
class Timings:
    """What the server learns while answering one request, for its reply's headers. Each
    request has its own, filled on the event loop as its events pass the service."""

    queue_s: float | None = None  # waiting for a batch
    ttft_s: float | None = None  # arrival to the first token
    cache: CacheResult | None = None  # None where no cache is configured


@dataclass(frozen=True)
class Reply:
    """What the service answers: the variant, and the events, which fill `timings` as they
    are read. Errors about the request come before the first event."""

    variant: str
    events: AsyncIterator[GenerationEvent]
    timings: Timings


class GatewayError(Exception):
    """Base of the errors a request can end with; the API layer maps each to a reply."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(GatewayError):
    pass


class ContextLengthError(InvalidRequestError):
    pass


class PayloadTooLargeError(InvalidRequestError):
    pass


class UnsupportedMediaTypeError(InvalidRequestError):
    pass


class RequestTimeoutError(GatewayError):
    """The request's body did not arrive in time."""


class NotFoundError(GatewayError):
    pass


class ModelNotFoundError(NotFoundError):
    pass


class AuthenticationError(GatewayError):
    pass


class PermissionDeniedError(GatewayError):
    pass


class OverloadedError(GatewayError):
    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(GatewayError):
    pass


class NotReadyError(GatewayError):
    pass


class EngineError(GatewayError):
    pass


class UpstreamError(GatewayError):
    """An upstream server refused the request (4xx, passed through with its status) or
    could not serve it (reported as 502 Bad Gateway / 503 when no replica is up)."""

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
