"""Upstream OpenAI-compatible servers: our workers, vLLM, TGI, llama.cpp's server.

Requests go to a healthy replica under its concurrency cap, chosen by the variant's routing
policy (`routing.py`: least outstanding, prefix or session), and are relayed as they
arrive. A replica that fails to connect or answers 5xx before the first byte is counted
against, and the request is tried once more on another replica; a 4xx is the client's and
passes through with its status. Replicas leave rotation after
`eject_after_failures` consecutive failures and come back when a health check passes.

When every replica is at its concurrency cap, requests wait at the gateway (up to
`max_waiting`, within their deadline) and each freed slot goes to the next in fair order:
higher priority classes first, the API keys of a class in turn. With `forward_priority`,
the class also goes to the upstream as vLLM's `priority` (lower is sooner; vLLM needs
`--scheduling-policy priority`); it always goes as `X-Priority`, which our workers (whose
auth is off: the gateway checked the key) take as the request's class.

Chat requests go to the upstream's /v1/chat/completions: the upstream holds the model's chat
template, the gateway does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client import Counter

from app.backends import refuse_unsupported
from app.backends.routing import Router
from app.choices import Choice, is_plain, is_plain_body, merge_choices, text_of
from app.domain import (
    PRIORITY_CLASSES,
    BackendEvent,
    DeadlineExceededError,
    EngineError,
    FinishReason,
    Generation,
    GenerationEvent,
    GenerationRequest,
    PreparedRequest,
    RequestContext,
    StopCause,
    TokenEvent,
    UpstreamError,
    Waited,
)
from app.metrics import Metrics
from app.settings import UpstreamSettings, VariantSettings
from app.tenancy.fair import AdmissionQueue

logger = logging.getLogger(__name__)


# The HTTP client is aiohttp: per request it costs a fraction of httpx's (BENCHMARKS.md),
# and its pool does not slow down with hundreds of connections as httpcore's does.

# The longest line of an upstream stream (one SSE event).
MAX_LINE_BYTES = 4 * 1024 * 1024
# Idle connections are closed before the upstream closes them: uvicorn (our workers, vLLM)
# closes after 5 s, and a request sent on a connection that is being closed fails ("Can not
# write request body") and costs a retry. aiohttp's default is 15 s.
KEEPALIVE_S = 4.0
# How long to wait for the end of a stream after its [DONE] event.
STREAM_END_GRACE_S = 1.0


@dataclass(eq=False)
class Replica:
    url: str
    session: aiohttp.ClientSession  # its own pool, capped at max_concurrency_per_replica
    outstanding: int = 0
    failures: int = 0
    healthy: bool = True


class _RetryElsewhere(Exception):
    """This replica failed before sending anything: another may succeed. `why` is for the
    client: no address, no library detail (those are logged)."""

    def __init__(self, detail: str, why: str) -> None:
        super().__init__(detail)
        self.why = why


class OpenAIBackend:
    kind = "openai"

    def __init__(self, variant: VariantSettings, metrics: Metrics) -> None:
        assert variant.upstream is not None
        self.name = variant.name
        self._settings: UpstreamSettings = variant.upstream
        self._default_max_tokens = variant.default_max_tokens
        self._model = variant.upstream.model or variant.name
        self.identity = f"openai:{self._model}"
        self.ready = False
        self._metrics = metrics
        self._replicas: dict[str, Replica] = {}
        self._client: aiohttp.ClientSession | None = None  # health checks
        self._tasks: list[asyncio.Task[None]] = []
        self._router = Router(variant.upstream.routing)
        self._decisions: dict[str, Counter] = {}
        self._waiting: AdmissionQueue[Replica] = AdmissionQueue(
            variant.upstream.max_waiting,
            unclaimed=self._release,
            on_change=metrics.upstream_waiting.labels(self.name).set,
        )

    async def start(self) -> None:
        s = self._settings
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        await self._resolve()
        await self._check_health()
        self._tasks = [
            asyncio.create_task(self._every(s.health_check_interval_s, self._check_health)),
            asyncio.create_task(self._every(s.resolve_interval_s, self._resolve)),
        ]
        logger.info("variant %s: upstream %s at %s", self.name, self._model, list(self._replicas))

    async def close(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            await self._client.close()
        for replica in self._replicas.values():
            await replica.session.close()

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        refuse_unsupported(request, self._settings.unsupported,
                           f"the variant {self.name!r} (its upstream server)")  # fmt: skip
        if request.messages is not None:
            prompt = json.dumps([m.as_sent() for m in request.messages])
        elif request.prompt_token_ids is not None:
            prompt = json.dumps(request.prompt_token_ids)
        else:
            prompt = request.prompt or ""
        max_tokens = request.max_tokens or self._default_max_tokens
        # Both go to the upstream as they came, and both may change its answer.
        extra = {**request.extra, **request.options}
        return PreparedRequest(request, prompt, max_tokens, extra=extra)

    async def generate(
        self, prepared: PreparedRequest, context: RequestContext
    ) -> AsyncIterator[BackendEvent]:
        request = prepared.request
        chat = request.messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = self._payload(prepared)
        if self._settings.forward_priority:
            payload["priority"] = context.priority
        body = json.dumps(payload).encode()
        tried: set[Replica] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (context.deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(2):
                    # The retry goes to another replica if there is one, else to the same
                    # on a new connection (a kept-alive one the server had just closed).
                    exclude = tried if self._has_other(tried) else set()
                    asked_at = time.monotonic()
                    replica = await self._acquire(exclude, prepared, context)
                    waited = time.monotonic() - asked_at  # for a slot: the upstream is busy
                    tried.add(replica)
                    try:
                        # Closed here, not later by the event loop: its connection must be
                        # back in the pool (or closed) before its slot passes on.
                        relay = self._relay(replica, path, body, request, context, waited)
                        async with aclosing(relay):  # type: ignore[type-var]
                            async for event in relay:
                                if isinstance(event, Generation):
                                    self._metrics.count_tokens(self.name, self.kind, event)
                                yield event
                        return
                    except _RetryElsewhere as exc:
                        logger.warning("variant %s, request %s: %s", self.name,
                                       context.request_id, exc)  # fmt: skip
                        if attempt == 1:
                            raise UpstreamError(
                                f"the upstream failed twice before answering ({exc.why})",
                                status=502,
                            ) from None
                    finally:
                        self._release(replica)
        except TimeoutError:
            raise DeadlineExceededError("the upstream did not answer within the deadline") from None

    def _payload(self, prepared: PreparedRequest) -> dict[str, Any]:
        r, s = prepared.request, prepared.request.sampling
        payload: dict[str, Any] = {
            **prepared.extra,  # nothing the client sent is dropped; what we set below wins
            "model": self._model,
            "max_tokens": prepared.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        # A client that wants one body gets the upstream's body: relaying it as a stream
        # would cost the gateway a parse and an event per token.
        payload["stream"] = r.stream
        if r.stream:
            payload["stream_options"] = {"include_usage": True}
        if r.messages is not None:
            payload["messages"] = [m.as_sent() for m in r.messages]
        else:
            payload["prompt"] = r.prompt_token_ids if r.prompt_token_ids is not None else r.prompt
        if r.stop:
            payload["stop"] = list(r.stop)
        if s.seed is not None:
            payload["seed"] = s.seed
        # vLLM's sampling extras, sent only when they ask for something.
        if s.top_k:
            payload["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            payload["repetition_penalty"] = s.repetition_penalty
        if s.ignore_eos:
            payload["ignore_eos"] = True
        if s.min_tokens:
            payload["min_tokens"] = s.min_tokens
        return payload

    async def _acquire(
        self, exclude: set[Replica], prepared: PreparedRequest, context: RequestContext
    ) -> Replica:
        """A replica with a free slot, now counted as this request's; behind the requests
        already waiting for one."""
        replica = None if self._waiting else self._choose(exclude, prepared, context)
        tenant = context.tenant.name if context.tenant is not None else None
        while replica is None:
            handed = await self._waiting.wait(context.priority, tenant)
            if handed is not None:
                # The freed slot is this request's, but where it goes is the policy's
                # (another replica may hold its prefix, or the handed one be excluded):
                # nothing can take it between here and the choice, which does not wait.
                handed.outstanding -= 1
            replica = self._choose(exclude, prepared, context)
            if replica is None and handed is not None:
                self._waiting.wake(None)  # a slot this request cannot use: the next looks
        replica.outstanding += 1
        return replica

    def _release(self, replica: Replica) -> None:
        if replica.healthy and replica.url in self._replicas and self._waiting.wake(replica):
            return
        replica.outstanding -= 1
        self._waiting.wake(None)  # a waiter looks again (and learns if none is up)

    def _choose(
        self, exclude: set[Replica], prepared: PreparedRequest, context: RequestContext
    ) -> Replica | None:
        """The routing policy's choice among the healthy replicas under their cap; None if
        all are at it."""
        cap = self._settings.max_concurrency_per_replica
        candidates = [
            r for r in self._replicas.values()
            if r.healthy and r not in exclude and r.outstanding < cap
        ]  # fmt: skip
        if not candidates:
            if any(r.healthy for r in self._replicas.values()):
                return None
            raise UpstreamError(f"no replica of {self.name!r} is up", status=503)
        prompt = prepared.prompt if isinstance(prepared.prompt, str) else ""
        replica, reason = self._router.choose(candidates, prompt, context.user_key)
        counter = self._decisions.get(reason)
        if counter is None:
            labels = (self.name, self._router.policy, reason)
            counter = self._decisions[reason] = self._metrics.route_decisions_total.labels(*labels)
        counter.inc()
        return replica

    def _has_other(self, tried: set[Replica]) -> bool:
        return any(r.healthy and r not in tried for r in self._replicas.values())

    async def _relay(
        self,
        replica: Replica,
        path: str,
        body: bytes,
        request: GenerationRequest,
        context: RequestContext,
        waited: float,
    ) -> AsyncIterator[GenerationEvent | Waited]:
        """The upstream's answer as events, with the time spent waiting on it (`waited` so
        far, then the connection, the answer's head and each read of its body)."""
        stream, chat = request.stream, request.messages is not None
        # Our workers take the class from the header (vLLM from `priority`).
        headers = {"Content-Type": "application/json",
                   "X-Priority": PRIORITY_CLASSES[context.priority]}  # fmt: skip
        try:
            sent_at = time.monotonic()
            response = await replica.session.post(replica.url + path, data=body, headers=headers)
            waited += time.monotonic() - sent_at
        except aiohttp.ClientError as exc:
            self._failed(replica)
            raise _RetryElsewhere(
                f"{replica.url}: {type(exc).__name__}: {exc}", "could not connect"
            ) from exc
        chunks = 0
        try:
            if response.status >= 500:
                self._failed(replica)
                raw = await response.read()
                raise _RetryElsewhere(
                    f"{replica.url} answered {response.status}: {raw[:500]!r}",
                    f"it answered {response.status}: {_error_message(raw)[0]}",
                )
            if response.status >= 400:
                raise _upstream_client_error(response.status, await response.read())
            replica.failures = 0
            if stream:
                async for event in _parse_stream(response, chat, waited):
                    chunks += isinstance(event, TokenEvent)
                    yield event
            else:
                read_at = time.monotonic()
                raw = await response.read()
                yield Waited(waited + time.monotonic() - read_at)
                try:
                    answer = json.loads(raw)
                except ValueError as exc:
                    logger.warning("request %s: %s: invalid JSON: %s", context.request_id,
                                   replica.url, exc)  # fmt: skip
                    raise EngineError("the upstream's answer was not valid JSON") from exc
                for event in _parse_body(answer, chat):
                    yield event
        except aiohttp.ClientError as exc:
            self._failed(replica)
            logger.warning("request %s: %s: %s: %s", context.request_id, replica.url,
                           type(exc).__name__, exc)  # fmt: skip
            what = (
                f"the stream after {chunks} chunk(s), before its end" if stream
                else "the connection before its answer"
            )  # fmt: skip
            raise EngineError(f"the upstream closed {what}") from exc
        finally:
            # Back to the pool when fully read; otherwise (the client left) the connection
            # is closed, which tells the upstream to stop generating.
            response.release()

    def _failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.failures >= self._settings.eject_after_failures and replica.healthy:
            replica.healthy = False
            self._router.forget(replica.url)
            logger.warning("variant %s: replica %s ejected", self.name, replica.url)
        self._publish_health()

    async def _check_health(self) -> None:
        assert self._client is not None
        for replica in list(self._replicas.values()):
            try:
                url = replica.url + self._settings.health_path
                async with self._client.get(url) as response:
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                if not replica.healthy:
                    logger.info("variant %s: replica %s is back", self.name, replica.url)
                replica.healthy, replica.failures = True, 0
            else:
                self._failed(replica)
        self._publish_health()

    def _publish_health(self) -> None:
        self.ready = any(r.healthy for r in self._replicas.values())
        for replica in self._replicas.values():
            gauge = self._metrics.upstream_replica_healthy.labels(self.name, replica.url)
            gauge.set(1 if replica.healthy else 0)

    async def _resolve(self) -> None:
        """Expand each replica URL to one per address its host resolves to."""
        loop = asyncio.get_running_loop()
        urls: list[str] = []
        for base in self._settings.replicas:
            parts = urlsplit(base)
            host, port = (
                parts.hostname or "",
                parts.port or (443 if parts.scheme == "https" else 80),
            )
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addresses = sorted({str(info[4][0]) for info in infos})
            except OSError:
                addresses = []
            if len(addresses) <= 1:
                urls.append(base)  # keep the name: TLS and virtual hosts need it
                continue
            for address in addresses:
                netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                urls.append(urlunsplit(parts._replace(netloc=netloc)))
        current = self._replicas
        self._replicas = {url: current.get(url) or self._new_replica(url) for url in urls}
        for gone in set(current) - set(self._replicas):
            self._router.forget(gone)
            self._metrics.upstream_replica_healthy.remove(self.name, gone)
            await current[gone].session.close()
        self._publish_health()

    def _new_replica(self, url: str) -> Replica:
        s = self._settings
        # No read timeout: a generation may take minutes; the request's deadline bounds it.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s)
        connector = aiohttp.TCPConnector(
            limit=s.max_concurrency_per_replica,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_S,
        )
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return Replica(url, session)

    async def _every(self, interval_s: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(Exception):
                await job()


def _error_message(body: bytes) -> tuple[str, Any]:
    """An upstream's error body as (message, param): OpenAI's error object, TGI's, or text."""
    message, param = body.decode(errors="replace")[:1000], None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body)
        error = data.get("error", data)
        if isinstance(error, dict):
            message, param = str(error.get("message", message)), error.get("param")
        elif isinstance(error, str):
            message = error
    return message, param


def _upstream_client_error(status: int, body: bytes) -> UpstreamError:
    message, param = _error_message(body)
    return UpstreamError(f"upstream: {message}", status=status, param=param)


def _generation(
    text: str,
    finish: str | None,
    stop_reason: Any,
    usage: dict[str, int] | None,
    pieces: int,
    body: dict[str, Any] | None = None,
) -> Generation:
    if finish is None:
        raise EngineError("the upstream ended before the generation finished")
    reason: FinishReason = "length" if finish == "length" else "stop"
    cause: StopCause = (
        "length" if reason == "length" else "stop_sequence" if isinstance(stop_reason, str)
        else "eos_token"
    )  # fmt: skip
    return Generation(
        text=text,
        finish_reason=reason,
        stop_cause=cause,
        prompt_tokens=(usage or {}).get("prompt_tokens", 0),
        completion_tokens=(usage or {}).get("completion_tokens", pieces),
        body=body,
    )


def _parse_body(body: dict[str, Any], chat: bool) -> list[GenerationEvent]:
    """The upstream's body, kept whole for the reply (`Generation.body`). A body of one
    choice's text also yields that text as a token, so that a stream replayed from the
    cache streams it as before; a richer body is replayed from its choices."""
    try:
        choices = body["choices"]
        first = next(c for c in choices if c.get("index", 0) == 0)
        text = text_of(first, chat)
    except (KeyError, IndexError, TypeError, AttributeError, StopIteration) as exc:
        logger.warning("an upstream answer that is not a completion: %r", exc)
        raise EngineError("the upstream's answer is not a completion") from exc
    generation = _generation(text, first.get("finish_reason"), first.get("stop_reason"),
                             body.get("usage"), 1, body)  # fmt: skip
    if text and is_plain_body(choices, chat):
        return [TokenEvent(token_id=-1, text=text, logprob=None), generation]
    return [generation]


async def _parse_stream(
    response: aiohttp.ClientResponse, chat: bool, waited: float
) -> AsyncIterator[GenerationEvent | Waited]:
    """The upstream's SSE events as our events. Everything already received is handled in one
    pass and its tokens leave as one event: a gateway that falls behind (hundreds of streams)
    then pays the per-event cost downstream (encode, write) once per read rather than once per
    token, and catches up; a token is never held back to wait for another.

    The time spent waiting for each read is added to `waited` (the time the event was
    downstream is the gateway's) and reported before the first token and at the end."""
    text: list[str] = []
    finish: str | None = None
    stop_reason: Any = None
    usage: dict[str, int] | None = None
    partial = b""  # the start of a line whose end has not arrived
    done = False
    reported = False  # the wait until the first token
    read_at = time.monotonic()
    async for data in response.content.iter_any():
        waited += time.monotonic() - read_at
        *lines, partial = (partial + data).split(b"\n")
        if len(partial) > MAX_LINE_BYTES:
            raise EngineError(f"the upstream sent an event longer than {MAX_LINE_BYTES} bytes")
        pieces: list[str] = []  # choice 0's text
        choices: list[list[Choice]] = []
        rich = False  # some choice holds more than choice 0's text: relay them whole
        error: str | None = None
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
                if "error" in chunk:
                    raw = chunk["error"]
                    message = raw.get("message", raw) if isinstance(raw, dict) else raw
                    error = f"upstream: {message}"
                    break
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                chunk_choices = chunk.get("choices") or []
                choices.append(chunk_choices)
                for choice in chunk_choices:
                    part = (choice.get("delta") or {}) if chat else choice
                    piece = part.get("content" if chat else "text")
                    if piece is not None and not isinstance(piece, str):
                        raise TypeError("a choice whose text is not a string")
                    rich = rich or not is_plain(choice, chat)
                    if choice.get("index", 0) != 0:
                        continue
                    if piece:
                        pieces.append(piece)
                    finish = choice.get("finish_reason") or finish
                    stop_reason = choice.get("stop_reason", stop_reason)
            except (ValueError, AttributeError, TypeError) as exc:
                logger.warning("an upstream event that is not a completion chunk: %r", exc)
                error = "the upstream sent an event that is not a completion chunk"
                break
        if pieces or rich:
            text.extend(pieces)
            if not reported:
                yield Waited(waited)
                waited, reported = 0.0, True
            merged = tuple(merge_choices(choices)) if rich else None
            yield TokenEvent(token_id=-1, text="".join(pieces), logprob=None, choices=merged)
        if error is not None:
            raise EngineError(error)
        read_at = time.monotonic()
        if done:
            # Read to the end of the body so that the connection goes back to the pool: a
            # response left unread is closed, and the next request would pay a new
            # connection (and the upstream a new accept) before its first token.
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                await asyncio.wait_for(response.content.read(), STREAM_END_GRACE_S)
            break
    yield Waited(waited + time.monotonic() - read_at)
    yield _generation("".join(text), finish, stop_reason, usage, len(text))
