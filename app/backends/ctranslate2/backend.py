"""Local CTranslate2 engine behind the DynamicBatcher.

Each request becomes a `_Sequence`: its prompt tokens, its own limits (max tokens, stop
sequences, deadline) and an event queue. CTranslate2 calls back once per generated token
from its worker thread; the sequence decides there whether it is done, and returning True
stops that batch entry alone, so a request never runs past its own limits in a shared batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ctranslate2

from app.backends import refuse_unsupported
from app.backends.ctranslate2.batcher import DynamicBatcher
from app.backends.ctranslate2.model import ModelMetadata, is_prepared
from app.backends.ctranslate2.tokenizer import Detokenizer, ModelTokenizer
from app.choices import logprobs_object, stream_choice
from app.domain import (
    BackendEvent,
    ContextLengthError,
    DeadlineExceededError,
    EngineError,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidRequestError,
    NotReadyError,
    PreparedRequest,
    RequestContext,
    Scheduled,
    StopCause,
    TokenEvent,
    Waited,
)
from app.metrics import Metrics
from app.settings import OPTION_NAMES, VariantSettings

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The variant's model cannot be served; the message says what to do."""


# The API's options this engine has no mechanism for (an upstream server, vLLM, does).
_UNSUPPORTED = OPTION_NAMES - {"logprobs", "top_logprobs", "n"}


def _group(request: GenerationRequest) -> Hashable:
    """Requests with equal groups can share one generate_batch call (its decoding options).
    Log-probabilities cost about 4% of a batch's throughput: only batches that want them."""
    sampling = request.sampling
    shared = (sampling.repetition_penalty, sampling.ignore_eos, request.logprobs)
    if sampling.greedy:
        return ("greedy", *shared)
    return ("sample", sampling.temperature, sampling.top_k, sampling.top_p, *shared)


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# CTranslate2's names for the options it checks, and the request fields they come from.
_OPTIONS = {
    "sampling_topk": "top_k",
    "sampling_topp": "top_p",
    "sampling_temperature": "temperature",
    "repetition penalty": "repetition_penalty",
    "repetition_penalty": "repetition_penalty",
    "max_length": "max_tokens",
}


def _refused(exc: ValueError) -> InvalidRequestError:
    """The engine's refusal of a batch's options, which its requests share (a batch is
    formed of requests with equal options): a client error naming the field."""
    message = str(exc)
    param = next((field for option, field in _OPTIONS.items() if option in message), None)
    return InvalidRequestError(f"the engine refused the request: {message}", param=param)


class _Sequence:
    """One request inside the batcher. `on_token` runs on the engine thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: GenerationRequest,
        context: RequestContext,
        prompt_ids: list[int],
        start_tokens: list[str],
        max_tokens: int,
        end_token_ids: frozenset[int],
        detokenizer: Detokenizer,
        count_outcome: Callable[[str], None],
    ) -> None:
        self._loop = loop
        self._count_outcome = count_outcome
        self._events: asyncio.Queue[BackendEvent | Exception] = asyncio.Queue()
        self._end_token_ids = frozenset() if request.sampling.ignore_eos else end_token_ids
        self._detokenizer = detokenizer
        self.sampling = request.sampling
        self.group = _group(request)
        self.logprobs = request.logprobs
        self.deadline = context.deadline
        self.priority = context.priority
        self.tenant = context.tenant.name if context.tenant is not None else None
        self.prompt_tokens = len(prompt_ids)
        self.start_tokens = start_tokens
        self.max_tokens = max_tokens
        self.cost_tokens = len(prompt_ids) + max_tokens
        self.completion_tokens = 0
        self.finished = False
        self.cancelled = False

    # -- engine thread ---------------------------------------------------------------------

    def on_start(self, at: float) -> None:
        self._put(Scheduled(at))

    def on_token(self, token_id: int, logprob: float | None) -> bool:
        """Take one generated token and its log-probability; True stops this sequence."""
        if self.finished:
            return True
        if self.cancelled:
            self.fail(EngineError("cancelled"))
            return True
        if time.monotonic() >= self.deadline:
            self.fail(DeadlineExceededError("the request did not finish within its deadline"))
            return True
        if token_id in self._end_token_ids:
            self._finish("stop", "eos_token")
            return True
        self.completion_tokens += 1
        text = self._detokenizer.add(token_id)
        self._put(TokenEvent(token_id=token_id, text=text, logprob=logprob))
        if self._detokenizer.stopped:
            self._finish("stop", "stop_sequence")
        elif self.completion_tokens >= self.max_tokens:
            self._finish("length", "length")
        return self.finished

    def _finish(self, reason: FinishReason, cause: StopCause) -> None:
        self._detokenizer.flush()
        self.finished = True
        self._count_outcome("finished")
        self._put(
            Generation(
                text=self._detokenizer.text,
                finish_reason=reason,
                stop_cause=cause,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
            )
        )

    # -- any thread ------------------------------------------------------------------------

    def fail(self, error: Exception) -> None:
        if not self.finished:
            self.finished = True
            self._count_outcome("cancelled" if self.cancelled else "failed")
            self._put(error)

    def _put(self, event: BackendEvent | Exception) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    # -- event loop ------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[BackendEvent]:
        """The engine's events, with the time spent waiting for them (`Waited`) before the
        first token and before the end."""
        # The loop's clock may differ from time.monotonic() (uvloop): convert once.
        deadline = self._loop.time() + (self.deadline - time.monotonic())
        waited, reported = 0.0, False
        while True:
            if self._events.empty():
                waiting_since = time.monotonic()
                try:
                    # A timer, not wait_for: this runs once per token (no task per wait).
                    async with asyncio.timeout_at(deadline):
                        event = await self._events.get()
                except TimeoutError:
                    raise DeadlineExceededError(
                        "the request did not finish within its deadline"
                    ) from None
                waited += time.monotonic() - waiting_since
            else:
                event = self._events.get_nowait()
            if isinstance(event, Exception):
                raise event
            if not reported and isinstance(event, TokenEvent):
                yield Waited(waited)
                waited, reported = 0.0, True
            elif isinstance(event, Generation):
                yield Waited(waited)
                yield event
                return
            yield event


async def _choices(
    sequences: list[_Sequence], chat: bool, logprobs: bool
) -> AsyncIterator[BackendEvent]:
    """The events of one request's several sequences as one reply's: each token as a delta
    of its choice (`TokenEvent.choices`, with its finish), the first sequence's timings, and
    one `Generation` at the end (the first choice's text, every choice's tokens)."""
    queue: asyncio.Queue[tuple[int, BackendEvent | Exception]] = asyncio.Queue()

    async def pump(index: int, sequence: _Sequence) -> None:
        try:
            async for event in sequence.events():
                queue.put_nowait((index, event))
        except Exception as exc:  # raised again by the reader below
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sequences)]
    ended: dict[int, Generation] = {}
    streamed = [0] * len(sequences)  # characters of each choice so far
    try:
        while len(ended) < len(sequences):
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, TokenEvent):
                lp = None
                if logprobs and event.logprob is not None:
                    lp = logprobs_object([(event.text, event.logprob)], streamed[index], chat)
                choice = stream_choice(index, event.text, chat, lp)
                streamed[index] += len(event.text)
                text = event.text if index == 0 else ""  # the reply's text is the first's
                yield TokenEvent(event.token_id, text, event.logprob, choices=(choice,))
            elif isinstance(event, Generation):
                ended[index] = event
                tail = event.text[streamed[index] :]
                finish = stream_choice(index, tail, chat, None, event.finish_reason)
                yield TokenEvent(-1, tail if index == 0 else "", None, choices=(finish,))
            elif index == 0:
                yield event
        first = ended[0]
        yield replace(first, completion_tokens=sum(g.completion_tokens for g in ended.values()))
    finally:
        for task in tasks:
            task.cancel()


class CTranslate2Backend:
    kind = "ctranslate2"

    def __init__(self, variant: VariantSettings, metrics: Metrics) -> None:
        self.name = variant.name
        self._settings = variant
        self._metrics = metrics
        self._generator: Any = None
        self._tokenizer: ModelTokenizer | None = None
        self._metadata: ModelMetadata | None = None
        self._batcher: DynamicBatcher[_Sequence] | None = None
        self.identity = ""  # set at start: path, content fingerprint, compute type
        self.ready = False

    @property
    def context_length(self) -> int:
        assert self._metadata is not None
        return self._metadata.context_length

    async def start(self) -> None:
        s = self._settings
        model_dir = Path(s.model_path)
        if not is_prepared(model_dir):
            raise ModelLoadError(
                f"variant {s.name!r}: no prepared model at {model_dir}; "
                "run `model-gateway prepare-model` (default model) or `model-gateway convert`"
            )
        device = s.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        supported = ctranslate2.get_supported_compute_types(device)
        if s.compute_type not in {*supported, "default", "auto"}:
            raise ModelLoadError(
                f"variant {s.name!r}: compute_type {s.compute_type!r} is not supported on "
                f"{device} here; choose one of {', '.join(sorted(supported))}"
            )
        inter_threads = s.inter_threads or (os.cpu_count() or 1 if device == "cpu" else 1)
        fingerprint = await asyncio.to_thread(_fingerprint, model_dir / "model.bin")
        self.identity = f"{model_dir.resolve()}:{fingerprint}:{s.compute_type}"
        self._metadata = ModelMetadata.load(model_dir)
        self._tokenizer = ModelTokenizer(model_dir, self._metadata)
        self._generator = await asyncio.to_thread(
            ctranslate2.Generator,
            str(model_dir),
            device=device,
            compute_type=s.compute_type,
            inter_threads=inter_threads,
            intra_threads=s.intra_threads,
        )
        b = s.batching
        self._batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=b.max_batch_size,
            max_wait_ms=b.max_wait_ms,
            arrival_gap_ms=b.arrival_gap_ms,
            max_batch_tokens=b.max_batch_tokens,
            max_queue_size=b.max_queue_size,
            concurrency=inter_threads,
            long_tokens=b.long_request_tokens,
            observer=self._metrics.batch_observer(s.name),
        )
        self._batcher.start()
        self.ready = True
        logger.info(
            "variant %s: %s on %s (%s), %d batch(es) at once x %d thread(s)",
            s.name, model_dir, device, s.compute_type, inter_threads, s.intra_threads,
        )  # fmt: skip

    async def close(self) -> None:
        self.ready = False
        if self._batcher is not None:
            batcher, self._batcher = self._batcher, None
            await batcher.close()
        self._generator = None

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        if self._tokenizer is None:
            raise NotReadyError(f"model {self.name!r} is not loaded")
        where = f"the variant {self.name!r} (the CTranslate2 engine)"
        refuse_unsupported(request, _UNSUPPORTED, where)
        options = request.options
        batch = self._settings.batching.max_batch_size
        if options.get("n", 1) > batch:
            raise InvalidRequestError(
                f"n ({options['n']}) is above {where}'s batch size ({batch}): its choices "
                "are one batch", param="n",
            )  # fmt: skip
        if options.get("n", 1) > 1 and request.sampling.greedy:
            raise InvalidRequestError(  # as vLLM
                "n above 1 needs sampling (a temperature above 0): greedy choices would all "
                "be the same", param="n",
            )  # fmt: skip
        # Log-probabilities it has, of the chosen token only: no alternatives.
        for name in ("top_logprobs", "logprobs"):
            if not isinstance(options.get(name, 0), bool) and options.get(name, 0) > 0:
                raise InvalidRequestError(
                    f"{name} above 0 is not supported by {where}: it gives the chosen "
                    "token's log-probability, without alternatives", param=name,
                )  # fmt: skip
        for i, message in enumerate(request.messages or ()):
            parts = (message.raw or {}).get("content")
            for part in parts if isinstance(parts, list) else ():
                if part.get("type") != "text":
                    raise InvalidRequestError(
                        f"content parts of type {part.get('type')!r} are not supported by "
                        f"{where}: it reads text", param=f"messages.{i}.content"
                    )  # fmt: skip
        if request.sampling.min_tokens:
            # CTranslate2 takes min_length per batch, not per sequence: refuse, don't drop.
            raise InvalidRequestError(
                "min_tokens is not supported by this model's engine (CTranslate2)",
                param="min_tokens",
            )
        vocab_size = self._tokenizer.vocab_size
        if request.sampling.top_k > vocab_size:
            raise InvalidRequestError(
                f"top_k ({request.sampling.top_k}) is larger than the model's vocabulary "
                f"({vocab_size} tokens)",
                param="top_k",
            )
        prompt_ids = self._prompt_ids(request, self._tokenizer)
        max_tokens = self._max_tokens(request, len(prompt_ids))
        # Asking for logprobs changes the reply's shape: part of the cache key.
        extra = {**options, "token_logprobs": True} if request.logprobs else dict(options)
        return PreparedRequest(request, prompt_ids, max_tokens, extra=extra)

    async def generate(
        self, prepared: PreparedRequest, context: RequestContext
    ) -> AsyncIterator[BackendEvent]:
        batcher, tokenizer = self._batcher, self._tokenizer
        if batcher is None or tokenizer is None:
            raise NotReadyError(f"model {self.name!r} is not loaded")
        request, prompt_ids = prepared.request, prepared.prompt
        assert isinstance(prompt_ids, list), "prepared by another backend"
        # n choices are n sequences of the batcher: they usually share a batch.
        sequences = [
            _Sequence(
                asyncio.get_running_loop(),
                request,
                context,
                prompt_ids,
                tokenizer.tokens(prompt_ids),
                prepared.max_tokens,
                tokenizer.end_token_ids,
                tokenizer.detokenizer(prompt_ids, request.stop),
                self._count_outcome,
            )
            for _ in range(request.options.get("n", 1))
        ]
        try:
            for sequence in sequences:
                batcher.submit(sequence)
            events = (
                sequences[0].events() if len(sequences) == 1
                else _choices(sequences, request.messages is not None,
                              "logprobs" in request.options)
            )  # fmt: skip
            async for event in events:
                if isinstance(event, Generation):
                    self._metrics.count_tokens(self.name, self.kind, event)
                yield event
        finally:
            for sequence in sequences:
                if not sequence.finished:
                    sequence.cancelled = True  # a running sequence stops at its next token
                    if batcher.remove(sequence):
                        sequence.fail(EngineError("cancelled"))

    def _count_outcome(self, outcome: str) -> None:
        self._metrics.engine_sequences_total.labels(self.name, outcome).inc()

    def _prompt_ids(self, request: GenerationRequest, tokenizer: ModelTokenizer) -> list[int]:
        if request.messages is not None:
            ids = tokenizer.encode_chat(request.messages)
        elif request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            ids = tokenizer.encode(request.prompt or "")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens; "
                f"the prompt has {len(ids)} tokens, which leaves no room to generate.",
                param="messages" if request.messages is not None else "prompt",
            )
        if request.prompt_token_ids is not None:
            bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                    param="prompt",
                )
        return ids

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        if request.max_tokens is None:
            return min(self._settings.default_max_tokens, room)
        if request.max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, you requested {prompt_tokens + request.max_tokens} tokens "
                f"({prompt_tokens} in the prompt, {request.max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.",
                param="max_tokens",
            )
        return request.max_tokens

    def _run_batch(self, batch: list[_Sequence]) -> None:
        """Runs on an engine thread; one generate_batch call for sequences of one group."""
        sampling = batch[0].sampling
        assert self._metadata is not None
        options: dict[str, Any] = {"repetition_penalty": sampling.repetition_penalty}
        if not sampling.greedy:
            options.update(
                sampling_temperature=sampling.temperature,
                sampling_topk=sampling.top_k,  # 0: the whole vocabulary
                sampling_topp=sampling.top_p,
            )
        live = [seq for seq in batch if not seq.cancelled]
        if not live:
            return
        started = time.monotonic()
        for seq in live:
            seq.on_start(started)
        try:
            self._generator.generate_batch(
                [seq.start_tokens for seq in live],
                max_length=max(seq.max_tokens for seq in live),
                include_prompt_in_result=False,
                end_token=[] if sampling.ignore_eos else list(self._metadata.end_tokens),
                return_scores=batch[0].logprobs,  # each step's token its log-probability
                callback=lambda step: live[step.batch_id].on_token(step.token_id, step.log_prob),
                **options,
            )
        except ValueError as exc:  # CTranslate2 refusing an option: the requests' own
            raise _refused(exc) from exc
