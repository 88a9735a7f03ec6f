"""The gateway's overhead as the field measures it, beside LiteLLM's proxy: open-loop arrivals
at fixed rates against an instant OpenAI-compatible mock upstream, straight to the mock
(`direct`), through a minimal Python proxy (`floor`: `minimal_proxy.py`, plus a chunk-by-chunk
relay for streams), through our gateway (one process, a `backend: openai` variant on the mock,
cache and auth off) and through LiteLLM's proxy (one worker, the mock as an `openai/` model;
no database, no callbacks, logging at ERROR), each proxy on the same pinned cores.

    python bench/bench_peers.py --proxy-cpus 1 --client-cpus 0 --upstream-cpus 0 \\
        --litellm /work/litellm-venv/bin/litellm --tree /tmp/peers-tree --rounds 3

LiteLLM lives in a venv of its own (`python3 -m venv DIR && DIR/bin/pip install
'litellm[proxy]'`); without `--litellm` (or with a path that is not there) it is left out.
`--tree DIR` runs the gateway of another checkout (`git worktree add DIR REF`) with this
Python, so that the gateway under test is a fixed snapshot.

What is measured, per mode (`json`: one chat completion body; `stream`: 64 tokens 2 ms apart,
a usage chunk and [DONE]) and per rate: arrivals are Poisson (`--arrivals uniform` for evenly
spaced) from one client process per client core, each request on a kept-alive connection
from a pool that grows as needed; latency counts from the request's scheduled arrival (no
coordinated omission) to the last byte of its answer (a stream's `[DONE]`). Each segment is
`--warmup-s` uncounted, then `--duration-s` counted (arrivals in that window); `added`
latency is a proxy's percentile minus direct's at the same rate in the same round. The
proxy's CPU is its process tree's user + system seconds over the counted window, and the
time its threads waited for a core (schedstat) says what neighbours took from it. Rounds
rotate the order of the proxies at each rate; tables give medians over rounds. A proxy that
falls behind a rate (answers < 90 % of the window's arrivals, or > 1 % errors) is not run at
higher rates in that round. `sustainable` is the highest rate of the sweep at which every
round ran with no error and the median added p99 was <= `--p99-budget-ms`; the `CPU
ceiling`, 1 / CPU per request at the highest rate it kept up with (latency aside). Last, one
stream alone at a time, each proxy in turn: its tokens/s (64 / time to [DONE]) against
direct's.

`mock` runs the mock upstream alone; `floor_app` is the floor's ASGI app (`uvicorn
bench.bench_peers:floor_app`, `UPSTREAM=...`). Prints a Markdown section; `--jsonl` keeps
every segment and single stream, and `--report FILE` prints the section again from one
(with the run's options). Stdlib only, but for the floor's aiohttp (as the gateway's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench import minimal_proxy  # noqa: E402
from bench.bench_scale_out import (  # noqa: E402
    _cpu_seconds,
    content_length,
    cpus,
    free_port,
    gateway_env,
    new_loop,
    serve_on_port,
    split_request,
    stop,
    wait_ready,
)

MODEL = "m"
TOKENS = 64
TOKEN_INTERVAL_S = 0.002
MASTER_KEY = "sk-bench-peers"
PROXIES = ("direct", "floor", "gateway", "litellm")
STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
OVERHEAD_HEADERS = (b"\r\nx-litellm-overhead-duration-ms:", b"\r\nx-gateway-overhead-ms:")


# --- the mock upstream ----------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _answers(chat: bool) -> tuple[bytes, list[bytes]]:
    """The whole JSON reply, and the stream's writes (HTTP chunks; the last also ends it)."""
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": "cmpl-0", "object": kind, "created": 0, "model": MODEL}
    usage = {"prompt_tokens": 8, "completion_tokens": TOKENS, "total_tokens": 8 + TOKENS}
    text = "".join(f" t{i}" for i in range(TOKENS))
    content: dict[str, Any] = (
        {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    )
    choice = {"index": 0, **content, "finish_reason": "length"}
    body = json.dumps({**head, "choices": [choice], "usage": usage}).encode()
    whole = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    chunk = {**head, "object": "chat.completion.chunk" if chat else kind}
    writes = []
    for i in range(TOKENS):
        piece: dict[str, Any] = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
        finish = "length" if i == TOKENS - 1 else None
        event = _event({**chunk, "choices": [{"index": 0, **piece, "finish_reason": finish}]})
        writes.append(_frame(event))
    writes[0] = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + writes[0]
    )
    tail = _event({**chunk, "choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    writes[-1] += _frame(tail) + b"0\r\n\r\n"
    return whole, writes


ANSWERS = {True: _answers(True), False: _answers(False)}


class MockUpstream(asyncio.Protocol):
    """HTTP/1.1, kept-alive connections: `GET` anything -> 200 `{}`; `POST` -> a completion
    (chat if the path has `/chat/`) at once, or with `"stream": true` its 64 tokens 2 ms
    apart on a fixed clock (token i at i x 2 ms), then a usage chunk and [DONE]. A request
    that arrives during a stream waits for its end. Bodies must come with Content-Length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.streaming: list[bytes] = []
        self.next_at = 0.0
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._answer()

    def _answer(self) -> None:
        replies = []
        while not self.streaming and (request := split_request(self.buffer)) is not None:
            head, body, self.buffer = request
            if not head.startswith(b"post"):
                replies.append(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                continue
            whole, writes = ANSWERS[b"/chat/" in head[: head.find(b"\r\n")]]
            if STREAM_TRUE.search(body):
                self.streaming = list(reversed(writes))
                self.next_at = self.loop.time()
                replies.append(self.streaming.pop())
            else:
                replies.append(whole)
        if replies:
            self.transport.write(b"".join(replies))
        if self.streaming:
            self.next_at += TOKEN_INTERVAL_S
            self.loop.call_at(self.next_at, self._tick)

    def _tick(self) -> None:
        if self.closed:
            return
        self.transport.write(self.streaming.pop())
        if self.streaming:
            self.next_at += TOKEN_INTERVAL_S
            self.loop.call_at(self.next_at, self._tick)
        else:
            self._answer()  # a request that came meanwhile


def serve_mock(port: int, core: int | None) -> None:
    serve_on_port(MockUpstream, port, core)


def mock_main(args: argparse.Namespace) -> None:
    cores: list[int | None] = list(cpus(args.cpus)) if args.cpus else [None]
    procs = [multiprocessing.Process(target=serve_mock, args=(args.port, c)) for c in cores]
    for proc in procs:
        proc.daemon = True
        proc.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the daemons go with it
    for proc in procs:
        proc.join()


# --- the floor: the least a Python proxy does -------------------------------------------------

_session: Any = None


async def floor_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`minimal_proxy.app` for a JSON request; a streaming one is relayed the same way, but
    chunk by chunk as the upstream's bytes arrive (minimal_proxy.py reads whole bodies)."""
    global _session
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if not STREAM_TRUE.search(body):

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await minimal_proxy.app(scope, replay, send)
        return
    import aiohttp

    if _session is None:
        _session = aiohttp.ClientSession()
    headers = {"Content-Type": "application/json"}
    url = minimal_proxy.UPSTREAM + scope["path"]
    async with _session.post(url, data=body, headers=headers) as reply:
        start = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": reply.status, "headers": start})
        async for data in reply.content.iter_any():
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


# --- the open-loop client -------------------------------------------------------------------


@dataclass
class Segment:
    """What one client process sends: `rate` is its share."""

    host: str
    port: int
    request: bytes
    stream: bool
    rate: float
    warmup_s: float
    duration_s: float
    start_at: float  # wall-clock time
    poisson: bool
    offset_s: float  # uniform arrivals: this process's phase
    seed: int
    timeout_s: float
    max_connections: int


@dataclass
class Tally:
    """What it found, for the arrivals in the counted window."""

    sent: int = 0
    ok: int = 0
    timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, to the last byte
    first_bytes: list[float] = field(default_factory=list)  # seconds, to the first body byte
    overhead_ms: list[float] = field(default_factory=list)  # the proxy's own header, if any

    def add(self, other: Tally) -> None:
        self.sent += other.sent
        self.ok += other.ok
        self.timeouts += other.timeouts
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        self.latencies += other.latencies
        self.first_bytes += other.first_bytes
        self.overhead_ms += other.overhead_ms


class HTTPError(Exception):
    pass


@dataclass
class Answer:
    first: float  # perf_counter when the first byte of the body came (JSON: the end)
    end: float
    overhead_ms: float | None
    keep: bool  # the connection may be used again


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stream: bool
) -> Answer:
    """One request on a connection, its whole answer read (a stream: to its [DONE])."""
    clock = time.perf_counter
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise HTTPError(head[9:12].decode(errors="replace"))
    lower = head.lower()
    overhead = None
    for name in OVERHEAD_HEADERS:
        at = lower.find(name)
        if at >= 0:
            with contextlib.suppress(ValueError):
                overhead = float(lower[at + len(name) : lower.find(b"\r\n", at + 2)])
    length = content_length(lower)
    first = 0.0
    tail = b""
    if length is not None:
        tail = (await reader.readexactly(length))[-64:]
        first = clock()
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            first = first or clock()
            tail = (tail + data[:-2])[-64:]
    else:
        raise HTTPError("an answer with neither content-length nor chunks")
    end = clock()
    if stream and b"[DONE]" not in tail:
        raise HTTPError("a stream without [DONE]")
    return Answer(first, end, overhead, b"\r\nconnection: close" not in lower)


def arrivals(segment: Segment) -> list[float]:
    """This process's scheduled send times, seconds from the segment's start."""
    total = segment.warmup_s + segment.duration_s
    if not segment.poisson:
        step = 1 / segment.rate
        return [segment.offset_s + i * step for i in range(int(total * segment.rate) + 1)]
    rng = random.Random(segment.seed)
    times, t = [], rng.expovariate(segment.rate)
    while t < total:
        times.append(t)
        t += rng.expovariate(segment.rate)
    return times


async def run_segment(s: Segment) -> Tally:
    clock = time.perf_counter  # uvloop's loop.time() is a cached millisecond clock
    schedule = [t for t in arrivals(s) if t < s.warmup_s + s.duration_s]
    tally = Tally()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0

    async def connection(fresh: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An idle kept-alive connection (the most recently used: the pool stays small), or a
        new one; the flag says which."""
        nonlocal opened
        while idle and not fresh:
            reader, writer = idle.pop()
            if not reader.at_eof():
                return reader, writer, True
            discard(writer)
        if opened >= s.max_connections:
            raise HTTPError("client connection cap")
        opened += 1
        try:
            reader, writer = await asyncio.open_connection(s.host, s.port)
        except BaseException:
            opened -= 1
            raise
        return reader, writer, False

    def discard(writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        writer.close()
        opened -= 1

    async def one(scheduled: float, counted: bool) -> None:
        writer = None
        try:
            async with asyncio.timeout(s.timeout_s):
                reader, writer, reused = await connection(fresh=False)
                try:
                    answer = await exchange(reader, writer, s.request, s.stream)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    discard(writer)
                    writer = None
                    if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                        raise
                    # A kept-alive connection that the server had just closed: once more.
                    reader, writer, _ = await connection(fresh=True)
                    answer = await exchange(reader, writer, s.request, s.stream)
            if answer.keep:
                idle.append((reader, writer))
                writer = None
            if counted:
                tally.ok += 1
                tally.latencies.append(answer.end - (t0 + scheduled))
                tally.first_bytes.append(answer.first - (t0 + scheduled))
                if answer.overhead_ms is not None:
                    tally.overhead_ms.append(answer.overhead_ms)
        except TimeoutError:
            tally.timeouts += counted
        except Exception as exc:
            if counted:
                kind = str(exc) if isinstance(exc, HTTPError) else type(exc).__name__
                tally.errors[kind] = tally.errors.get(kind, 0) + 1
        finally:
            if writer is not None:
                discard(writer)

    await asyncio.sleep(max(0.0, s.start_at - time.time()))
    t0 = clock()
    tasks = []
    i = 0
    while i < len(schedule):
        now = clock() - t0
        while i < len(schedule) and schedule[i] <= now:
            counted = schedule[i] >= s.warmup_s
            tally.sent += counted
            tasks.append(asyncio.create_task(one(schedule[i], counted)))
            i += 1
        if i < len(schedule):
            await asyncio.sleep(max(0.0, schedule[i] - (clock() - t0)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return tally


def _client(segment: Segment, core: int | None, out: Any) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    loop = new_loop()
    out.put(loop.run_until_complete(run_segment(segment)))


def request_bytes(url: str, stream: bool) -> bytes:
    host = url.removeprefix("http://")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": TOKENS, "temperature": 0, "stream": stream}  # fmt: skip
    raw = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
        % (host.encode(), MASTER_KEY.encode(), len(raw), raw)
    )


@dataclass
class Result:
    """One segment: one proxy, one mode, one rate, one round."""

    round: int
    mode: str
    proxy: str
    rate: float
    sent: int
    ok: int
    errors: int
    timeouts: int
    error_kinds: dict[str, int]
    achieved: float
    p50_ms: float
    p99_ms: float
    first_byte_p50_ms: float
    cpu_s: float  # the proxy's process tree, over the counted window
    cpu_ms_per_request: float
    cores_busy: float
    waiting: float  # of the window, the time the proxy's threads were runnable but not running
    overhead_header_p50_ms: float | None

    @property
    def overloaded(self) -> bool:
        return self.ok < 0.9 * self.sent or self.errors + self.timeouts > 0.01 * self.sent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_queue_wait_s(root_pid: int) -> float:
    """Seconds the threads of `root_pid`'s process tree have spent runnable, waiting for a
    core (Linux schedstat): what neighbours on its cores cost it."""
    total = 0
    for pid in _cpu_seconds(root_pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with (
                    contextlib.suppress(OSError, IndexError, ValueError),
                    open(f"/proc/{pid}/task/{tid}/schedstat") as f,
                ):
                    total += int(f.read().split()[1])
    return total / 1e9


def measure(
    url: str, stream: bool, rate: float, client_cores: list[int | None], args: argparse.Namespace,
    proxy_pid: int | None, round_: int, mode: str, proxy: str,
) -> Result:  # fmt: skip
    host, _, port = url.removeprefix("http://").partition(":")
    start_at = time.time() + 0.3
    n = len(client_cores)
    out: Any = multiprocessing.Queue()
    procs = []
    for k, core in enumerate(client_cores):
        segment = Segment(
            host=host, port=int(port), request=request_bytes(url, stream), stream=stream,
            rate=rate / n, warmup_s=args.warmup_s, duration_s=args.duration_s,
            start_at=start_at, poisson=args.arrivals == "poisson", offset_s=k / rate,
            seed=round_ * 1_000_003 + int(rate) * 101 + k + (mode == "stream"),
            timeout_s=args.timeout_s, max_connections=args.max_connections // n,
        )  # fmt: skip
        procs.append(multiprocessing.Process(target=_client, args=(segment, core, out)))
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start_at + args.warmup_s - time.time()))
    before = sum(_cpu_seconds(proxy_pid).values()) if proxy_pid else 0.0
    wait_before = run_queue_wait_s(proxy_pid) if proxy_pid else 0.0
    time.sleep(args.duration_s)
    cpu_s = sum(_cpu_seconds(proxy_pid).values()) - before if proxy_pid else 0.0
    waiting = run_queue_wait_s(proxy_pid) - wait_before if proxy_pid else 0.0
    tally = Tally()
    for _ in procs:
        tally.add(out.get())
    for proc in procs:
        proc.join()
    return Result(
        round=round_, mode=mode, proxy=proxy, rate=rate, sent=tally.sent, ok=tally.ok,
        errors=sum(tally.errors.values()), timeouts=tally.timeouts, error_kinds=tally.errors,
        achieved=tally.ok / args.duration_s,
        p50_ms=1000 * percentile(tally.latencies, 0.5),
        p99_ms=1000 * percentile(tally.latencies, 0.99),
        first_byte_p50_ms=1000 * percentile(tally.first_bytes, 0.5),
        cpu_s=cpu_s, cpu_ms_per_request=1000 * cpu_s / max(1, tally.sent),
        cores_busy=cpu_s / args.duration_s, waiting=waiting / args.duration_s,
        overhead_header_p50_ms=(
            statistics.median(tally.overhead_ms) if tally.overhead_ms else None
        ),
    )  # fmt: skip


async def one_stream(url: str) -> float:
    """One stream alone, on a fresh connection: tokens/s from the request to its [DONE]."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.perf_counter()
        answer = await exchange(reader, writer, request_bytes(url, True), True)
        return TOKENS / (answer.end - started)
    finally:
        writer.close()


# --- the proxies under test -------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    url: str
    process: subprocess.Popen[bytes] | None


def pinned(command: list[str], cores: str | None) -> list[str]:
    return ["taskset", "-c", cores, *command] if cores else command


def launch(
    name: str, command: list[str], cwd: Path, env: dict[str, str], port: int, ready: str,
    log: Path,
) -> Proxy:  # fmt: skip
    with open(log, "ab") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=sink,
                                   start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + ready, process, timeout_s=180)
    except RuntimeError:
        stop(process)
        raise RuntimeError(f"{name} did not start; its log: {log}") from None
    return Proxy(name, url, process)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_GATEWAY_", "LITELLM"))}


def start_mock(cores: str | None, logs: Path) -> Proxy:
    port = free_port()
    command = [sys.executable, __file__, "mock", "--port", str(port)]
    command += ["--cpus", cores] if cores else []
    return launch("mock", command, ROOT, clean_env(), port, "/health", logs / "mock.log")


def start_floor(upstream: str, cores: str | None, logs: Path) -> Proxy:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.bench_peers:floor_app", "--host",
               "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-access-log"]  # fmt: skip
    env = {**clean_env(), "UPSTREAM": upstream}
    return launch("floor", pinned(command, cores), ROOT, env, port, "/health", logs / "floor.log")


def start_gateway(
    upstream: str, tree: Path, cores: str | None, logs: Path, name: str = "gateway"
) -> Proxy:
    port = free_port()
    env = gateway_env(upstream, workers=1)
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return launch(name, pinned(command, cores), tree, env, port, "/ready",
                  logs / f"{name}.log")  # fmt: skip


LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream}/v1
      api_key: unused
litellm_settings:
  set_verbose: false
  json_logs: false
  telemetry: false
  num_retries: 0
  request_timeout: 60
general_settings:
  master_key: {key}
  disable_spend_logs: true
  disable_error_logs: true
"""


def start_litellm(binary: str, upstream: str, cores: str | None, logs: Path) -> Proxy:
    """One worker, no database (none is configured), no callbacks, logging at ERROR."""
    port = free_port()
    config = logs / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(model=MODEL, upstream=upstream, key=MASTER_KEY))
    env = {**clean_env(), "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    for name in ("DATABASE_URL", "PYTHONPATH"):  # its own venv's packages, and no database
        env.pop(name, None)
    command = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"]  # fmt: skip
    return launch("litellm", pinned(command, cores), logs, env, port, "/health/liveliness",
                  logs / "litellm.log")  # fmt: skip


def litellm_version(binary: str) -> str:
    """From the Python beside the command (a venv's), else from the command itself (slow:
    it loads the proxy)."""
    python = Path(binary).parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    env = {**clean_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env.pop("PYTHONPATH", None)
    command = [str(python), "-c", code] if python.exists() else [binary, "--version"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = done.stdout.split()
    return words[-1] if done.returncode == 0 and words else "unknown"


def warm_up(url: str, n: int) -> None:
    async def run() -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(n):
                stream = i % 2 == 1
                await exchange(reader, writer, request_bytes(url, stream), stream)
        finally:
            writer.close()

    asyncio.run(run())


def wait_idle(pids: list[int], limit: float = 0.1, timeout_s: float = 20) -> None:
    """Until the proxies (all on the same cores) are idle: one still draining a backlog
    would take CPU from the next one measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = sum(sum(_cpu_seconds(pid).values()) for pid in pids)
        time.sleep(0.3)
        if sum(sum(_cpu_seconds(pid).values()) for pid in pids) - before < limit * 0.3:
            return


# --- the rotation and the report ----------------------------------------------------------------


def rates_of(text: str) -> list[float]:
    return sorted(float(x) for x in text.split(","))


def run(args: argparse.Namespace) -> None:
    logs = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    client_cores: list[int | None] = (
        list(cpus(args.client_cpus)) if args.client_cpus else [None] * args.client_processes
    )
    if args.client_cpus:
        os.sched_setaffinity(0, set(cpus(args.client_cpus)))
    names = ["direct"] + [p for p in args.proxies.split(",") if p and p != "direct"]
    litellm = args.litellm if args.litellm and shutil.which(args.litellm) else None
    if "litellm" in names and litellm is None:
        print(f"LiteLLM left out: no {args.litellm!r}", file=sys.stderr)
        names.remove("litellm")
    tree = (args.tree or ROOT).resolve()
    jsonl = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    modes = [m for m in args.modes.split(",") if m]
    sweeps = {"json": rates_of(args.json_rates), "stream": rates_of(args.stream_rates)}
    results: list[Result] = []
    streams: dict[str, list[float]] = {name: [] for name in names}
    t_start = time.monotonic()
    mock = start_mock(args.upstream_cpus, logs)
    proxies: dict[str, Proxy] = {"direct": Proxy("direct", mock.url, None)}
    try:
        for name in names:
            if name == "floor":
                proxies[name] = start_floor(mock.url, args.proxy_cpus, logs)
            elif name == "gateway":
                proxies[name] = start_gateway(mock.url, tree, args.proxy_cpus, logs)
            elif name == "baseline":
                proxies[name] = start_gateway(mock.url, args.baseline_tree.resolve(),
                                              args.proxy_cpus, logs, "baseline")  # fmt: skip
            elif name == "litellm":
                assert litellm is not None
                proxies[name] = start_litellm(litellm, mock.url, args.proxy_cpus, logs)
        for proxy in proxies.values():
            warm_up(proxy.url, 200)
        pids = [p.process.pid for p in proxies.values() if p.process is not None]
        for round_ in range(1, args.rounds + 1):
            for mode in modes:
                behind: set[str] = set()
                for k, rate in enumerate(sweeps[mode]):
                    turn = (round_ + k) % len(names)
                    for name in names[turn:] + names[:turn]:
                        if name in behind or "direct" in behind:
                            continue
                        proxy = proxies[name]
                        pid = proxy.process.pid if proxy.process else None
                        wait_idle(pids)
                        result = measure(proxy.url, mode == "stream", rate, client_cores, args,
                                         pid, round_, mode, name)  # fmt: skip
                        line = json.dumps(
                            {"t": round(time.monotonic() - t_start), **asdict(result)}
                        )
                        print(line, file=sys.stderr, flush=True)
                        if jsonl:
                            print(line, file=jsonl, flush=True)
                        results.append(result)
                        if result.overloaded:
                            behind.add(name)
            for i in range(args.single_streams):
                turn = i % len(names)
                for name in names[turn:] + names[:turn]:
                    wait_idle(pids, timeout_s=5)
                    value = asyncio.run(one_stream(proxies[name].url))
                    streams[name].append(value)
                    if jsonl:
                        record = {"round": round_, "single_stream": name, "tokens_per_s": value}
                        print(json.dumps(record), file=jsonl, flush=True)
    finally:
        for proxy in proxies.values():
            if proxy.process is not None:
                stop(proxy.process)
        assert mock.process is not None
        stop(mock.process)
        if jsonl:
            jsonl.close()
    report = render(results, streams, names, sweeps, modes, args, tree, litellm)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)


def git_head(tree: Path) -> str:
    try:
        command = ["git", "-C", str(tree), "log", "-1", "--format=%h %s"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    vendor = fields.get("Vendor ID", "?").strip()
    model = fields.get("Model name", "?").strip()
    return f"{vendor} {model}, {os.cpu_count()} logical CPUs"


def render(
    results: list[Result], streams: dict[str, list[float]], names: list[str],
    sweeps: dict[str, list[float]], modes: list[str], args: argparse.Namespace, tree: Path,
    litellm: str | None,
) -> str:  # fmt: skip
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def cell(value: float, digits: int = 2) -> str:
        return "—" if value != value else f"{value:.{digits}f}"  # NaN: none measured

    by: dict[tuple[str, str, float], list[Result]] = {}
    for r in results:
        by.setdefault((r.mode, r.proxy, r.rate), []).append(r)
    direct = {(r.mode, r.rate, r.round): r for r in results if r.proxy == "direct"}

    def added(r: Result, what: str) -> float:
        base = direct.get((r.mode, r.rate, r.round))
        return float("nan") if base is None else getattr(r, what) - getattr(base, what)

    lines = [
        f"Command: `python bench/bench_peers.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}; {datetime.date.today().isoformat()}; Python "
        f"{platform.python_version()}; gateway: `{git_head(tree)}`"
        + (f"; LiteLLM {litellm_version(litellm)}" if litellm else ""),
        "",
        f"Cores: every proxy on `{args.proxy_cpus or 'any'}`, one process each; clients on "
        f"`{args.client_cpus or 'any'}`, the mock upstream on `{args.upstream_cpus or 'any'}`. "
        f"{args.arrivals.capitalize()} arrivals; each segment {args.warmup_s:g} s warm-up + "
        f"{args.duration_s:g} s counted; {args.rounds} rounds, the order of the proxies "
        "rotating; medians over rounds. Added = the proxy's percentile minus direct's at the "
        "same rate and round. CPU: the proxy's process tree over the counted window.",
    ]
    sustainable: dict[tuple[str, str], float] = {}
    ceiling: dict[tuple[str, str], tuple[float, float]] = {}  # (rate, CPU ms per request)
    for mode in modes:
        title = (
            "JSON (one chat completion body)" if mode == "json"
            else f"streaming ({TOKENS} tokens {1000 * TOKEN_INTERVAL_S:g} ms apart; latency "
            "to [DONE])"
        )  # fmt: skip
        lines += [
            "",
            f"#### {title}",
            "",
            "| rate req/s | proxy | rounds | achieved req/s | p50 ms | p99 ms | added p50 ms "
            "| added p99 ms | first byte p50 ms | errors / timeouts | CPU ms/req | cores busy |",
            "| --- " * 12 + "|",
        ]
        for rate in sweeps[mode]:
            for name in names:
                runs = by.get((mode, name, rate), [])
                if not runs:
                    lines.append(f"| {rate:g} | {name} | 0 | behind at a lower rate | | | | | "
                                 "| | | |")  # fmt: skip
                    continue
                cpu = name != "direct"
                lines.append(
                    f"| {rate:g} | {name} | {len(runs)} "
                    f"| {median([r.achieved for r in runs]):,.0f} "
                    f"| {cell(median([r.p50_ms for r in runs]))} "
                    f"| {cell(median([r.p99_ms for r in runs]))} "
                    f"| {'' if not cpu else cell(median([added(r, 'p50_ms') for r in runs]))} "
                    f"| {'' if not cpu else cell(median([added(r, 'p99_ms') for r in runs]))} "
                    f"| {cell(median([r.first_byte_p50_ms for r in runs]))} "
                    f"| {sum(r.errors for r in runs)} / {sum(r.timeouts for r in runs)} "
                    f"| {cell(median([r.cpu_ms_per_request for r in runs])) if cpu else ''} "
                    f"| {cell(median([r.cores_busy for r in runs])) if cpu else ''} |"
                )
        for name in names[1:]:
            best = 0.0
            for rate in sweeps[mode]:
                runs = by.get((mode, name, rate), [])
                ok = (
                    len(runs) == args.rounds
                    and all(r.errors + r.timeouts == 0 and not r.overloaded for r in runs)
                    and median([added(r, "p99_ms") for r in runs]) <= args.p99_budget_ms
                )
                if ok:
                    best = rate
            sustainable[(mode, name)] = best
            kept_up = [
                by[(mode, name, rate)] for rate in sweeps[mode]
                if len(by.get((mode, name, rate), [])) == args.rounds
                and not any(r.overloaded for r in by[(mode, name, rate)])
            ]  # fmt: skip
            if kept_up:
                top = kept_up[-1]
                ceiling[(mode, name)] = (top[0].rate, median([r.cpu_ms_per_request for r in top]))
    cores = len(cpus(args.proxy_cpus)) if args.proxy_cpus else os.cpu_count() or 1
    lines += [
        "",
        f"#### Sustainable rate (no error, median added p99 <= {args.p99_budget_ms:g} ms; "
        f"the highest rate of the sweep that passes in every round), per core "
        f"({cores} proxy core{'s' if cores > 1 else ''})",
        "",
        "| proxy | " + " | ".join(f"{m} req/s per core" for m in modes) + " |",
        "| --- " * (len(modes) + 1) + "|",
    ]
    for name in names[1:]:
        row = " | ".join(f"{sustainable[(m, name)] / cores:g}" for m in modes)
        lines.append(f"| {name} | {row} |")
    lines += [
        "",
        "#### CPU ceiling: 1 / (the proxy's CPU per request) at the highest rate it kept up "
        "with in every round (what one core serves when the CPU is the limit, latency aside)",
        "",
        "| proxy | "
        + " | ".join(f"{m}: at req/s, CPU ms/req, req/s per core" for m in modes)
        + " |",
        "| --- " * (len(modes) + 1) + "|",
    ]
    for name in names[1:]:
        cells = []
        for m in modes:
            rate, ms = ceiling.get((m, name), (float("nan"), float("nan")))
            cells.append(f"{rate:g}, {cell(ms)}, {cell(1000 / ms, 0)}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if streams and any(streams.values()):
        base = median(streams.get("direct", []))
        lines += [
            "",
            f"#### One stream alone ({TOKENS} tokens {1000 * TOKEN_INTERVAL_S:g} ms apart), "
            f"tokens/s to [DONE], median of {len(streams[names[0]])}",
            "",
            "| proxy | tokens/s | vs direct |",
            "| --- | --- | --- |",
        ]
        for name in names:
            value = median(streams[name])
            lines.append(f"| {name} | {value:.1f} | {value / base:.3f} |")
    headers = [
        (name, median([r.overhead_header_p50_ms for r in results
                       if r.proxy == name and r.overhead_header_p50_ms is not None]))
        for name in names
    ]  # fmt: skip
    waits = sorted(r.waiting for r in results if r.proxy != "direct")
    if waits:
        lines += [
            "",
            "Neighbours: the proxies' threads waited for their core (runnable, not running; "
            f"schedstat) a median {100 * percentile(waits, 0.5):.0f} % of a segment's window "
            f"(90th percentile {100 * percentile(waits, 0.9):.0f} %).",
        ]
    own = [f"{name} {value:.2f} ms" for name, value in headers if value == value]
    if own:
        lines += ["", f"The proxies' own overhead headers, median over segments: {', '.join(own)}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    mock = commands.add_parser("mock", help="the mock upstream alone")
    mock.add_argument("--port", type=int, default=8000)
    mock.add_argument("--cpus", help="one process per core, pinned")
    parser.add_argument("--proxies", default=",".join(PROXIES), help="direct always runs")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--json-rates", default="10,25,50,100,250,500,1000,2000,4000")
    parser.add_argument("--stream-rates", default="5,10,25,50,100,200,400")
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per request")
    parser.add_argument("--max-connections", type=int, default=2000, help="all clients")
    parser.add_argument("--single-streams", type=int, default=10, help="per proxy per round")
    parser.add_argument("--p99-budget-ms", type=float, default=5.0)
    parser.add_argument("--proxy-cpus", help="every proxy's cores, e.g. 1")
    parser.add_argument("--client-cpus", help="one client process per core, e.g. 0")
    parser.add_argument("--client-processes", type=int, default=1, help="without --client-cpus")
    parser.add_argument("--upstream-cpus", help="one mock process per core")
    parser.add_argument("--tree", type=Path, help="the checkout whose gateway to run")
    parser.add_argument("--baseline-tree", type=Path, help="adds the proxy `baseline`: the "
                        "gateway of this checkout (`git worktree add DIR REF`), to measure a "
                        "change side by side")  # fmt: skip
    parser.add_argument("--litellm", default="/work/litellm-venv/bin/litellm",
                        help="LiteLLM's `litellm` command, in its own venv")  # fmt: skip
    parser.add_argument("--jsonl", help="append every segment here")
    parser.add_argument("--markdown", help="also write the report here")
    parser.add_argument("--report", help="no run: the report of a --jsonl file, with these "
                        "options (rounds, rates, cores) as they were")  # fmt: skip
    args = parser.parse_args()
    if args.command == "mock":
        mock_main(args)
    elif args.report:
        report_main(args)
    else:
        run(args)


def report_main(args: argparse.Namespace) -> None:
    results: list[Result] = []
    streams: dict[str, list[float]] = {}
    with open(args.report) as f:
        for line in f:
            record = json.loads(line)
            if "single_stream" in record:
                streams.setdefault(record["single_stream"], []).append(record["tokens_per_s"])
            else:
                record.pop("t", None)
                results.append(Result(**record))
    names = ["direct"] + [p for p in args.proxies.split(",") if p and p != "direct"]
    names = [n for n in names if any(r.proxy == n for r in results)]
    sweeps = {"json": rates_of(args.json_rates), "stream": rates_of(args.stream_rates)}
    modes = [m for m in args.modes.split(",") if m]
    tree = (args.tree or ROOT).resolve()
    litellm = args.litellm if "litellm" in names else None
    print(render(results, streams, names, sweeps, modes, args, tree, litellm))


if __name__ == "__main__":
    main()
