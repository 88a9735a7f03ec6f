"""`model-gateway eval`: one fixed, versioned evaluation set (`eval_set.json`, written for this
project) run against OpenAI-compatible endpoints — our gateway's variants, our workers, vLLM,
any server — and reported per target, beside a reference:

- quality: accuracy on questions with known answers (capitals, arithmetic, short facts,
  instruction following); greedy agreement with the reference (exact, and the shadow
  comparison's word-level similarity, so that offline and online numbers mean the same);
  perplexity on held-out text where the target can score it (an upstream that answers
  vLLM's `prompt_logprobs`, or a local CTranslate2 model directory through `score_batch`);
- speed: tokens/s of one stream alone and of 32 at once, time to first token (p50);
- cost: size on disk (a target with a model directory) and the serving process's peak
  resident memory and GPU memory, sampled from its /metrics while it works.

Every request is greedy (temperature 0), so two runs of one target agree with each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import statistics
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from app.experiments.shadow import similarity

EVAL_SET = Path(__file__).with_name("eval_set.json")
Check = Literal["contains", "number", "exact", "exact_case"]

QUALITY_MAX_TOKENS = 48
SPEED_PROMPT = "Write a long story about a lighthouse keeper and the sea."
SPEED_MAX_TOKENS = 128
CONCURRENT_STREAMS = 32


class EvalError(Exception):
    """A target could not be evaluated; the message says which and why."""


@dataclass(frozen=True)
class Question:
    id: str
    kind: str
    question: str
    answers: tuple[str, ...]
    check: Check


@dataclass(frozen=True)
class EvalSet:
    version: int
    questions: tuple[Question, ...]
    texts: tuple[str, ...]  # held out, for perplexity


def load_eval_set(path: Path = EVAL_SET) -> EvalSet:
    data = json.loads(path.read_text())
    questions = tuple(
        Question(q["id"], q["kind"], q["question"], tuple(q["answers"]), q["check"])
        for q in data["questions"]
    )
    return EvalSet(data["version"], questions, tuple(data["texts"]))


# -- scoring ---------------------------------------------------------------------------------

_NOT_WORD = re.compile(r"[^\w]+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case, accents, punctuation and thousands separators off, one space between
    words: "  Paris, France!" -> "paris france"; "7,986" -> "7986"."""
    text = unicodedata.normalize("NFKD", _THOUSANDS.sub("", text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def score(question: Question, reply: str) -> int:
    """1 if `reply` answers `question`, else 0. A number is the last one on the reply's first
    line ("12 + 30 = 42", "The answer is 42.", "42"): what follows is often a ramble."""
    if question.check == "number":
        line = next((x for x in reply.splitlines() if x.strip()), "")
        numbers = _NUMBER.findall(_THOUSANDS.sub("", line))
        if not numbers:
            return 0
        return int(any(math.isclose(float(numbers[-1]), float(a)) for a in question.answers))
    if question.check == "exact_case":
        bare = reply.strip().strip("\"'.!`*")
        return int(bare in question.answers)
    said = normalize(reply)
    answers = [normalize(a) for a in question.answers]
    if question.check == "exact":
        return int(said in answers)
    return int(any(f" {a} " in f" {said} " for a in answers))


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible endpoint serving one model. `path`: the model's directory where it
    is local (size on disk; perplexity through CTranslate2 when the endpoint cannot score)."""

    name: str
    url: str
    model: str
    api_key: str | None = None
    path: Path | None = None

    @staticmethod
    def parse(spec: str) -> Target:
        """NAME=URL[,model=M][,path=DIR][,key=KEY]; the model defaults to NAME."""
        name, sep, rest = spec.partition("=")
        url, *options = rest.split(",")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise EvalError(f"a target is NAME=URL[,model=M][,path=DIR][,key=KEY], not {spec!r}")
        values: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("model", "path", "key"):
                raise EvalError(f"unknown target option {option!r} in {spec!r}")
            values[key] = value
        path = Path(values["path"]) if "path" in values else None
        return Target(name, url.rstrip("/"), values.get("model", name), values.get("key"), path)


@dataclass
class Result:
    target: str
    eval_set_version: int
    accuracy: float | None = None
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    agreement: float | None = None  # greedy outputs equal to the reference's
    similarity: float | None = None  # the shadow comparison's measure, mean
    perplexity: float | None = None
    perplexity_by: str | None = None  # how it was scored
    tokens_per_s_1: float | None = None
    tokens_per_s_32: float | None = None
    ttft_p50_ms: float | None = None
    size_bytes: int | None = None
    peak_rss_bytes: float | None = None
    peak_gpu_bytes: float | None = None
    replies: dict[str, str] = field(default_factory=dict)  # question id -> reply
    errors: list[str] = field(default_factory=list)


class _Client:
    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        self.target = target
        self._session = session
        self._headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.target.url + path
        async with self._session.post(url, json=body, headers=self._headers) as response:
            text = await response.text()
            if response.status != 200:
                raise EvalError(
                    f"{self.target.name}: {path} answered {response.status}: {text[:300]}"
                )
            answer: dict[str, Any] = json.loads(text)
            return answer

    async def chat(self, content: str, max_tokens: int) -> str:
        body = {"model": self.target.model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        answer = await self.post("/v1/chat/completions", body)
        return str(answer["choices"][0]["message"].get("content") or "")

    async def stream(self, max_tokens: int) -> tuple[float, float, int]:
        """One greedy stream of `max_tokens` (the end of sequence ignored): its time to the
        first token, its whole time, and its tokens."""
        body = {"model": self.target.model, "prompt": SPEED_PROMPT, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        started = time.monotonic()
        first: float | None = None
        tokens = chunks = 0
        url = self.target.url + "/v1/completions"
        async with self._session.post(url, json=body, headers=self._headers) as response:
            if response.status != 200:
                text = await response.text()
                raise EvalError(f"{self.target.name}: a stream answered {response.status}: "
                                f"{text[:300]}")  # fmt: skip
            async for line in response.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if any(c.get("text") for c in chunk.get("choices") or []):
                    chunks += 1
                    first = first or time.monotonic()
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
        ended = time.monotonic()
        if first is None:
            raise EvalError(f"{self.target.name}: a stream sent no token")
        return first - started, ended - started, tokens or chunks

    async def memory(self) -> tuple[float | None, float | None]:
        """The serving process's resident memory and its GPUs' used memory, from /metrics
        (ours, vLLM's) where it answers."""
        try:
            async with self._session.get(self.target.url + "/metrics") as response:
                if response.status != 200:
                    return None, None
                text = await response.text()
        except aiohttp.ClientError:
            return None, None
        rss = gpu = None
        for line in text.splitlines():
            if line.startswith("process_resident_memory_bytes "):
                rss = float(line.split()[-1])
            elif line.startswith("model_gateway_gpu_memory_used_bytes"):
                gpu = (gpu or 0.0) + float(line.split()[-1])
        return rss, gpu


async def _quality(client: _Client, questions: tuple[Question, ...], result: Result) -> None:
    # One at a time: an engine that batches may answer a prompt a little differently beside
    # others (padding, kernels), and two targets must be compared on the same footing.
    for q in questions:
        result.replies[q.id] = await client.chat(q.question, QUALITY_MAX_TOKENS)
    scores = {q.id: score(q, result.replies[q.id]) for q in questions}
    result.accuracy = statistics.fmean(scores.values())
    for kind in sorted({q.kind for q in questions}):
        result.accuracy_by_kind[kind] = statistics.fmean(
            scores[q.id] for q in questions if q.kind == kind
        )


async def _speed(client: _Client, result: Result) -> None:
    peaks: list[tuple[float | None, float | None]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peaks.append(await client.memory())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    try:
        alone = [await client.stream(SPEED_MAX_TOKENS) for _ in range(3)]
        result.tokens_per_s_1 = statistics.median(n / total for _, total, n in alone)
        started = time.monotonic()
        together = await asyncio.gather(
            *(client.stream(SPEED_MAX_TOKENS) for _ in range(CONCURRENT_STREAMS))
        )
        wall = time.monotonic() - started
        result.tokens_per_s_32 = sum(n for _, _, n in together) / wall
        result.ttft_p50_ms = 1000 * statistics.median(t for t, _, _ in alone)
    finally:
        done.set()
        await sampler
    rss = [r for r, _ in peaks if r is not None]
    gpu = [g for _, g in peaks if g is not None]
    result.peak_rss_bytes = max(rss) if rss else None
    result.peak_gpu_bytes = max(gpu) if gpu else None


async def _perplexity(client: _Client, texts: tuple[str, ...], result: Result) -> None:
    """From the endpoint's prompt log-probabilities (vLLM's `prompt_logprobs`), else from the
    local model directory with CTranslate2."""
    logprobs: list[float] = []
    try:
        for text in texts:
            body = {"model": client.target.model, "prompt": text, "max_tokens": 1,
                    "temperature": 0, "prompt_logprobs": 0}  # fmt: skip
            choice = (await client.post("/v1/completions", body))["choices"][0]
            scored = choice.get("prompt_logprobs")
            if not scored:
                raise EvalError("no prompt_logprobs")
            for position in scored[1:]:  # the first token has no context
                logprobs.append(max(float(p["logprob"]) for p in position.values()))
        result.perplexity_by = "prompt_logprobs"
    except (EvalError, KeyError, TypeError, ValueError, AttributeError):
        if client.target.path is None:
            return
        logprobs = await asyncio.to_thread(_ctranslate2_logprobs, client.target.path, texts)
        result.perplexity_by = "ctranslate2"
    result.perplexity = math.exp(-statistics.fmean(logprobs))


def _ctranslate2_logprobs(path: Path, texts: tuple[str, ...]) -> list[float]:
    import ctranslate2
    from tokenizers import Tokenizer

    from app.backends.ctranslate2.model import ModelMetadata

    metadata = ModelMetadata.load(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    generator = ctranslate2.Generator(str(path), device="cpu")
    prefix = [metadata.bos_token] if metadata.bos_token else []
    batch = [prefix + tokenizer.encode(t, add_special_tokens=False).tokens for t in texts]
    logprobs: list[float] = []
    for scored in generator.score_batch(batch):
        logprobs.extend(scored.log_probs)
    return logprobs


async def evaluate_target(target: Target, eval_set: EvalSet, *, speed: bool = True) -> Result:
    result = Result(target.name, eval_set.version)
    if target.path is not None:
        result.size_bytes = sum(f.stat().st_size for f in target.path.rglob("*") if f.is_file())
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = _Client(target, session)
        try:
            await _quality(client, eval_set.questions, result)
            await _perplexity(client, eval_set.texts, result)
            if speed:
                await _speed(client, result)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EvalError(f"{target.name} ({target.url}): {type(exc).__name__}: {exc}") from exc
    return result


def compare_with(reference: Result, results: list[Result]) -> None:
    """Each result's greedy agreement with the reference's replies."""
    for result in results:
        ids = [i for i in reference.replies if i in result.replies]
        result.agreement = statistics.fmean(
            normalize(result.replies[i]) == normalize(reference.replies[i]) for i in ids
        )
        result.similarity = statistics.fmean(
            similarity(result.replies[i], reference.replies[i]) for i in ids
        )


async def evaluate(targets: list[Target], reference: str | None = None,
                   *, speed: bool = True) -> list[Result]:  # fmt: skip
    """Each target in turn (so that they do not slow each other down), then the agreement of
    each with the reference (the first target unless named)."""
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise EvalError(f"target names must differ: {names}")
    if reference is not None and reference not in names:
        raise EvalError(f"the reference {reference!r} is none of the targets {names}")
    eval_set = load_eval_set()
    results = [await evaluate_target(t, eval_set, speed=speed) for t in targets]
    by_name = {r.target: r for r in results}
    compare_with(by_name[reference or names[0]], results)
    return results


# -- report ----------------------------------------------------------------------------------

COLUMNS = (
    "variant", "accuracy", "agreement", "similarity", "perplexity", "tok/s (1)", "tok/s (32)",
    "TTFT p50", "size", "peak RSS", "peak GPU",
)  # fmt: skip


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.0f} MB"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: list[Result], reference: str) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        name = f"{r.target} (reference)" if r.target == reference else r.target
        cells = [
            name,
            _number(r.accuracy, ".1%"),
            _number(r.agreement, ".1%"),
            _number(r.similarity, ".3f"),
            _number(r.perplexity, ".2f"),
            _number(r.tokens_per_s_1, ",.0f"),
            _number(r.tokens_per_s_32, ",.0f"),
            "n/a" if r.ttft_p50_ms is None else f"{r.ttft_p50_ms:.0f} ms",
            _mb(r.size_bytes),
            _mb(r.peak_rss_bytes),
            _mb(r.peak_gpu_bytes),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_report(results: list[Result], reference: str, out: Path) -> list[Path]:
    """eval.md, eval.json and (with matplotlib) eval.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.md", out / "eval.json"]
    written[0].write_text(markdown(results, reference))
    written[1].write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    with contextlib.suppress(ImportError):  # the picture needs matplotlib (`convert` extra)
        written.append(_plot(results, out / "eval.png"))
    return written


def _plot(results: list[Result], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    largest = max((r.size_bytes or 0) for r in results) or 1
    for r in results:
        if r.tokens_per_s_32 is None or r.accuracy is None:
            continue
        size = 200 + 1800 * (r.size_bytes or 0) / largest
        axes.scatter(r.tokens_per_s_32, 100 * r.accuracy, s=size, alpha=0.5)
        axes.annotate(r.target, (r.tokens_per_s_32, 100 * r.accuracy), ha="center")
    axes.set_xlabel("tokens/s, 32 streams at once")
    axes.set_ylabel("accuracy on the question set (%)")
    axes.set_title("Quality against speed (bubble: size on disk)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
