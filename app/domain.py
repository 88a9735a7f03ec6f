"""The types every layer below the API speaks, and the domain errors.

Wire schemas (pydantic) live with their API in `app/api/`; below it everything is a
dataclass. Going down: a `RequestContext` (who asks, by when) and a `GenerationRequest`
(what to generate). Coming up: `BackendEvent`s, which the service turns into a `Reply`.
Domain errors carry no HTTP status: `app/api/errors.py` is the one place that maps them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
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


# Priority classes, served in this order; a request's priority is an index into it.
PRIORITY_CLASSES = ("interactive", "standard", "batch")
STANDARD_PRIORITY = 1
BATCH_PRIORITY = 2


@dataclass(frozen=True)
class Tenant:
    """The API key a request came with, as the layers below the edge see it (never the
    secret). Limits of None are not enforced."""

    name: str
    models: frozenset[str] | None = None  # the served models it may use; None: all
    priority: int = STANDARD_PRIORITY  # the highest class its requests may have
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    max_concurrent: int | None = None
    daily_tokens: int | None = None  # per UTC day

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


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
    tenant: Tenant | None = None  # None: no key (auth off or optional)
    # An index into PRIORITY_CLASSES: the key's class, or a lower one the request asked for.
    priority: int = STANDARD_PRIORITY

    def with_priority(self, asked: int) -> RequestContext:
        """A request may lower its priority, never raise it."""
        return self if asked <= self.priority else replace(self, priority=asked)


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
    role: str  # system, user, assistant, tool
    content: str  # its text (text parts joined)
    # The message as the client sent it, where it holds more than role and text (tool calls,
    # a tool result's id, a name, image or audio parts): upstream servers get it as sent,
    # the local engine's chat template sees its fields.
    raw: dict[str, Any] | None = None

    def as_sent(self) -> dict[str, Any]:
        return self.raw if self.raw is not None else {"role": self.role, "content": self.content}


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
    # Fields of the API that change the output and that not every backend honours (tools,
    # response_format, logprobs, n, penalties...), as the client set them, where set to
    # other than their default. A backend refuses those it cannot honour, by name.
    options: dict[str, Any] = field(default_factory=dict)
    # Each token's log-probability is wanted (OpenAI's logprobs, TGI's details): a local
    # engine computes it only then.
    logprobs: bool = False

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
    # What else changes the reply, for the cache key: the client's unknown fields and the
    # options this backend passes on (upstream servers), or honours itself.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (may be empty: held back for a
    multi-byte character or a possible stop sequence)."""

    token_id: int
    text: str
    logprob: float | None
    # The upstream's stream choices these tokens came in, merged, where they hold more than
    # choice 0's text (tool calls, logprobs, several choices, a finish): relayed whole.
    choices: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class Generation:
    """The final event of every successful generation."""

    text: str
    finish_reason: FinishReason
    stop_cause: StopCause
    prompt_tokens: int
    completion_tokens: int
    # An upstream server's whole reply body (asked without streaming), relayed as it wrote
    # it but for the fields the gateway owns. `text` is its first choice's text.
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Scheduled:
    """The engine started the generation (its batch began) at `at`, time.monotonic()."""

    at: float


@dataclass(frozen=True)
class Waited:
    """Time the request spent waiting on its upstream server or engine (for a connection,
    a slot, its bytes, its tokens) since the last `Waited`. The rest of its time in the
    gateway is the gateway's overhead. A backend reports it before the first token and
    before the `Generation`: never per token."""

    seconds: float


@dataclass(frozen=True)
class Quota:
    """Where a key stands against its per-minute limits after a request was admitted (or
    refused): OpenAI's x-ratelimit-* headers. None where the key has no such limit."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None  # until the limit is whole again
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        for kind in ("requests", "tokens"):
            limit = getattr(self, f"limit_{kind}")
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(getattr(self, f"remaining_{kind}"))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(getattr(self, f"reset_{kind}_s"))
        return headers


def _duration(seconds: float) -> str:
    """OpenAI's spelling of a reset time: "1s", "6m0s", "20ms"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{rest:.0f}s"
    return f"{rest:.3g}s"


@dataclass(frozen=True)
class CacheLookup:
    """How the cache layer answered; before any token."""

    result: CacheResult


# What an API shapes into a reply: tokens, then one Generation.
GenerationEvent = TokenEvent | Generation
# What a backend yields; the service keeps the others for the reply's timings.
BackendEvent = Quota | Scheduled | Waited | CacheLookup | TokenEvent | Generation


@dataclass
class Timings:
    """What the server learns while answering one request, for its reply's headers. Each
    request has its own, filled on the event loop as its events pass the service."""

    queue_s: float | None = None  # waiting for a batch
    ttft_s: float | None = None  # arrival to the first token
    cache: CacheResult | None = None  # None where no cache is configured
    quota: Quota | None = None  # None where the request's key has no per-minute limits
    waited_s: float = 0.0  # on the upstream or engine, so far (the `Waited` events)

    def overhead_s(self, elapsed_s: float) -> float:
        """The gateway's own share of `elapsed_s` since arrival. Never negative: a request
        that joined an identical generation in flight is told of waits that began before
        it arrived."""
        return max(0.0, elapsed_s - self.waited_s)


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


class RateLimitedError(OverloadedError):
    """The request's key is over one of its limits (`reason`)."""

    def __init__(
        self, message: str, *, reason: str, retry_after_s: int, quota: Quota | None = None
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason = reason  # requests, tokens, concurrency, daily_tokens
        self.quota = quota


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
