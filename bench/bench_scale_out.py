"""Requests/s through 1, 2 and 4 gateway processes (`workers: N`) in front of an instant
upstream, each on cores of its own: does the gateway scale out with its processes?

    python bench/bench_scale_out.py run --workers 1,2,4 --rounds 5 \
        --upstream-cpus 0-3 --gateway-cpus 4-7 --client-cpus 8-15

`run` starts the instant upstream (one process per upstream core, SO_REUSEPORT), measures it
alone, then for each round and each N (the order rotating per round) starts `model-gateway
serve` with N processes on the first N gateway cores, warms up, counts the requests answered
in a fixed window, stops it; then the upstream alone again. Closed-loop clients (raw asyncio
HTTP/1.1, one process per client core, connections kept alive) send non-streaming
completions of 4 tokens. Prints a Markdown table; `--jsonl` keeps every measurement.

Stdlib only (uvloop when there is one), so that it runs wherever the gateway does.
`upstream` and `load` are the pieces, runnable alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
MODEL = "m"
ANSWER = json.dumps(
    {
        "id": "cmpl-0",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " a b c d", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
    }
).encode()
PROMPT = {"model": MODEL, "prompt": "Hello world", "max_tokens": 4, "temperature": 0}


def cpus(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]"""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.new_event_loop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def content_length(head: bytes) -> int | None:
    """The Content-Length of a lower-cased head whose lines each end in CRLF."""
    at = head.find(b"\r\ncontent-length:")
    return None if at < 0 else int(head[at + 17 : head.find(b"\r\n", at + 2)])


def split_request(buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The first whole request in `buffer`, as (its head in lower case, its body, what
    follows it); None until it has all arrived. Bodies must come with Content-Length."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[: end + 2].lower()  # each header line ends in \r\n
    length = content_length(head) or 0
    if len(buffer) < end + 4 + length:
        return None
    return head, buffer[end + 4 : end + 4 + length], buffer[end + 4 + length :]


# --- the instant upstream ---------------------------------------------------------------


class InstantUpstream(asyncio.Protocol):
    """HTTP/1.1 with kept-alive connections: `GET` anything -> 200 `{}`, `POST` anything ->
    the same completion, at once. Bodies must come with Content-Length (aiohttp's do)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while (request := split_request(self.buffer)) is not None:
            head, _, self.buffer = request
            body = ANSWER if head.startswith(b"post") else b"{}"
            replies.append(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
        if replies:
            self.transport.write(b"".join(replies))


def serve_on_port(protocol: Callable[[], asyncio.Protocol], port: int, core: int | None) -> None:
    """Serve `protocol` on `port` forever, pinned to `core`; several processes may share the
    port (SO_REUSEPORT: the kernel spreads the connections)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    loop = new_loop()
    loop.run_until_complete(loop.create_server(protocol, sock=sock))
    loop.run_forever()


def serve_upstream(port: int, core: int | None) -> None:
    serve_on_port(InstantUpstream, port, core)


def upstream_main(args: argparse.Namespace) -> None:
    cores = cpus(args.cpus) if args.cpus else [None] * args.processes
    procs = [
        multiprocessing.Process(target=serve_upstream, args=(args.port, core), daemon=True)
        for core in cores
    ]
    for proc in procs:
        proc.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the daemons go with it
    for proc in procs:
        proc.join()


# --- the load -----------------------------------------------------------------------------


@dataclass
class Load:
    """One measurement: requests answered in the window, their latency, and the CPU the
    server's processes used in it (cores busy = CPU seconds / window seconds)."""

    url: str
    connections: int
    window_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cores_busy: float = 0.0
    upstream_cores_busy: float = 0.0
    server_busy_per_process: list[float] = field(default_factory=list)


async def _connection(
    host: str, port: int, request: bytes, begin: float, end: float, latencies: list[float]
) -> int:
    """One kept-alive connection, closed loop, until `end`; latencies of the replies that
    come inside [begin, end). Returns the errors."""
    errors = 0
    clock = time.perf_counter  # uvloop's loop.time() is libuv's cached millisecond clock
    while clock() < end:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while True:
                started = clock()
                if started >= end:
                    break
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = content_length(head.lower())
                if length is None:
                    raise ValueError(f"no content-length: {head[:200]!r}")
                await reader.readexactly(length)
                done = clock()
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                elif begin <= done < end:
                    latencies.append(done - started)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()
    return errors


def _client(
    url: str, connections: int, core: int | None, start_at: float, warmup_s: float,
    duration_s: float, out: Any,
) -> None:  # fmt: skip
    if core is not None:
        os.sched_setaffinity(0, {core})
    host, _, port = url.removeprefix("http://").partition(":")
    body = json.dumps(PROMPT).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body)
    )

    async def run() -> tuple[list[float], int]:
        # Everyone starts together: `start_at` is wall-clock time, the window perf_counter.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.perf_counter() + warmup_s
        latencies: list[float] = []
        errors = await asyncio.gather(
            *(
                _connection(host, int(port), request, begin, begin + duration_s, latencies)
                for _ in range(connections)
            )
        )
        return latencies, sum(errors)

    loop = new_loop()
    out.put(loop.run_until_complete(run()))


def _cpu_seconds(root_pid: int) -> dict[int, float]:
    """User + system CPU seconds of `root_pid` and of each of its descendants alive now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    seconds: dict[int, float] = {}
    for pid in tree:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
        seconds[pid] = ticks / os.sysconf("SC_CLK_TCK")
    return seconds


def measure(
    url: str, connections: int, client_cores: list[int | None], warmup_s: float,
    duration_s: float, server_pid: int | None = None, upstream_pid: int | None = None,
) -> Load:  # fmt: skip
    """Closed-loop load from one process per client core; counts the replies in the window
    [warmup_s, warmup_s + duration_s) after a common start."""
    out: Any = multiprocessing.Queue()
    start_at = time.time() + 0.5
    n = len(client_cores)
    shares = [connections // n + (i < connections % n) for i in range(n)]
    procs = [
        multiprocessing.Process(
            target=_client, args=(url, share, core, start_at, warmup_s, duration_s, out)
        )
        for share, core in zip(shares, client_cores, strict=True)
    ]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start_at + warmup_s - time.time()))
    pids = (server_pid, upstream_pid)
    cpu_before = [_cpu_seconds(pid) if pid else {} for pid in pids]
    time.sleep(duration_s)
    cpu_after = [_cpu_seconds(pid) if pid else {} for pid in pids]
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    if not latencies:
        raise RuntimeError(f"no request to {url} was answered in the window")
    # Per process, cores busy in the window (those busy at all: not uvicorn's supervisor).
    busy = [
        sorted(
            (round((t - before.get(pid, 0.0)) / duration_s, 2) for pid, t in after.items()),
            reverse=True,
        )
        for before, after in zip(cpu_before, cpu_after, strict=True)
    ]
    return Load(
        url=url,
        connections=connections,
        window_s=duration_s,
        requests=len(latencies),
        errors=sum(errors for _, errors in results),
        rps=len(latencies) / duration_s,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        server_cores_busy=sum(busy[0]),
        upstream_cores_busy=sum(busy[1]),
        server_busy_per_process=[b for b in busy[0] if b >= 0.05],
    )


def load_main(args: argparse.Namespace) -> None:
    cores: list[int | None] = list(cpus(args.cpus)) if args.cpus else [None] * args.processes
    result = measure(args.url, args.connections, cores, args.warmup_s, args.duration_s)
    print(json.dumps(asdict(result)))


# --- the rotation ---------------------------------------------------------------------------


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer (exit code {process.poll()})")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group (uvicorn's supervisor and its workers), then kill."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def gateway_env(upstream: str, workers: int) -> dict[str, str]:
    """The environment of a gateway in front of `upstream` alone: no keys, no cache, no
    settings of ours (or LiteLLM's) from the caller's environment."""
    variant = {
        "name": MODEL,
        "backend": "openai",
        "upstream": {"replicas": [upstream], "max_concurrency_per_replica": 4096},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_GATEWAY_", "LITELLM"))}
    env.update(
        MODEL_GATEWAY_VARIANTS=json.dumps([variant]),
        MODEL_GATEWAY_AUTH="off",
        MODEL_GATEWAY_CACHE__ENABLED="false",
        MODEL_GATEWAY_LOG_LEVEL="warning",
        MODEL_GATEWAY_DRAIN_S="0",
        MODEL_GATEWAY_WORKERS=str(workers),
    )
    return env


def start_gateway(
    workers: int, cores: list[int], upstream: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = gateway_env(upstream, workers)
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if cores:
        command = ["taskset", "-c", ",".join(map(str, cores)), *command]
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/ready", process)
    except RuntimeError:
        stop(process)
        raise
    return process, url


def run_main(args: argparse.Namespace) -> None:
    workers = [int(n) for n in args.workers.split(",")]
    upstream_cores = cpus(args.upstream_cpus) if args.upstream_cpus else []
    gateway_cores = cpus(args.gateway_cpus) if args.gateway_cpus else []
    client_cores: list[int | None] = (
        list(cpus(args.client_cpus)) if args.client_cpus else [None] * args.client_processes
    )
    if gateway_cores and max(workers) > len(gateway_cores):
        sys.exit(f"--workers up to {max(workers)} needs as many --gateway-cpus")
    if args.client_cpus:
        os.sched_setaffinity(0, set(cpus(args.client_cpus)))
    port = free_port()
    command = [sys.executable, __file__, "upstream", "--port", str(port)]
    command += ["--cpus", args.upstream_cpus] if upstream_cores else ["--processes", "1"]
    upstream = subprocess.Popen(command, start_new_session=True)
    upstream_url = f"http://127.0.0.1:{port}"
    jsonl = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    results: dict[str, list[Load]] = {"upstream": [], **{str(n): [] for n in workers}}

    def record(key: str, load: Load, round_: int) -> None:
        results[key].append(load)
        line = json.dumps({"what": key, "round": round_, **asdict(load)})
        print(line, flush=True)
        if jsonl:
            print(line, file=jsonl, flush=True)

    def alone(round_: int) -> None:
        load = measure(upstream_url, args.connections, client_cores, args.warmup_s,
                       args.duration_s, server_pid=upstream.pid)  # fmt: skip
        record("upstream", load, round_)

    try:
        wait_ready(upstream_url + "/health", upstream)
        alone(0)
        for round_ in range(1, args.rounds + 1):
            turn = (round_ - 1) % len(workers)
            for n in workers[turn:] + workers[:turn]:
                gateway, url = start_gateway(n, gateway_cores[:n], upstream_url)
                # /ready is one process's answer: let the others come up before the clients
                # connect (a connection stays with the process that accepted it).
                time.sleep(args.settle_s)
                try:
                    load = measure(url, args.connections, client_cores, args.warmup_s,
                                   args.duration_s, gateway.pid, upstream.pid)  # fmt: skip
                finally:
                    stop(gateway)
                record(str(n), load, round_)
        alone(args.rounds + 1)
    finally:
        stop(upstream)
        if jsonl:
            jsonl.close()
    print_table(results, workers, args)


def print_table(results: dict[str, list[Load]], workers: list[int], args: Any) -> None:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    base = median([r.rps for r in results[str(workers[0])]]) / workers[0]
    rounds = len(results[str(workers[0])])
    print(
        f"\n{args.connections} connections, {rounds} rounds of {args.warmup_s:g} s warm-up + "
        f"{args.duration_s:g} s counted; medians over rounds; cores busy per gateway process "
        "from the median round\n"
    )
    print(
        "| gateway processes | requests/s (median) | per round | p50 ms | p99 ms "
        "| scaling efficiency | gateway cores busy (per process) | upstream cores busy "
        "| errors |"
    )
    print("| --- " * 9 + "|")
    for n in workers:
        runs = results[str(n)]
        rps = median([r.rps for r in runs])
        middle = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
        per_process = ", ".join(f"{b:.2f}" for b in middle.server_busy_per_process)
        print(
            f"| {n} | **{rps:,.0f}** | {', '.join(f'{r.rps:,.0f}' for r in runs)} "
            f"| {median([r.p50_ms for r in runs]):.1f} | {median([r.p99_ms for r in runs]):.1f} "
            f"| {rps / (n * base):.2f} "
            f"| {median([r.server_cores_busy for r in runs]):.2f} ({per_process}) "
            f"| {median([r.upstream_cores_busy for r in runs]):.2f} "
            f"| {sum(r.errors for r in runs)} |"
        )
    alone = results["upstream"]
    print(
        f"| upstream alone | {median([r.rps for r in alone]):,.0f} "
        f"| {', '.join(f'{r.rps:,.0f}' for r in alone)} "
        f"| {median([r.p50_ms for r in alone]):.2f} | {median([r.p99_ms for r in alone]):.2f} "
        f"| | | {median([r.server_cores_busy for r in alone]):.2f} "
        f"| {sum(r.errors for r in alone)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the whole rotation; prints a Markdown table")
    run.add_argument("--workers", default="1,2,4", help="gateway process counts")
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument("--upstream-cpus", help="e.g. 0-3: one upstream process per core")
    run.add_argument("--gateway-cpus", help="e.g. 4-7: N processes get the first N")
    run.add_argument("--client-cpus", help="e.g. 8-15: one client process per core")
    run.add_argument("--client-processes", type=int, default=2, help="without --client-cpus")
    run.add_argument("--connections", type=int, default=256, help="requests in flight")
    run.add_argument("--warmup-s", type=float, default=2.0)
    run.add_argument("--duration-s", type=float, default=6.0)
    run.add_argument("--settle-s", type=float, default=2.0, help="after /ready, before load")
    run.add_argument("--jsonl", help="append every measurement here")
    up = commands.add_parser("upstream", help="the instant upstream alone")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--cpus", help="one process per core, pinned")
    up.add_argument("--processes", type=int, default=1, help="without --cpus")
    load = commands.add_parser("load", help="one closed-loop measurement; prints JSON")
    load.add_argument("url")
    load.add_argument("--connections", type=int, default=256)
    load.add_argument("--cpus", help="one client process per core, pinned")
    load.add_argument("--processes", type=int, default=2, help="without --cpus")
    load.add_argument("--warmup-s", type=float, default=2.0)
    load.add_argument("--duration-s", type=float, default=6.0)
    args = parser.parse_args()
    {"run": run_main, "upstream": upstream_main, "load": load_main}[args.command](args)


if __name__ == "__main__":
    main()
