"""The gateway's own per-request cost, without a network or an engine: the app called as an
ASGI function for `POST /v1/completions` (JSON, cache bypassed) whose variant is a stand-in
backend that answers at once (one token). Everything the gateway does per request runs —
edge, routing, validation, assignment, cache and observing layers, reply shaping, metrics —
and nothing else, so two versions compare at a resolution the closed-loop overhead bench
(`bench_gateway_overhead.py`) cannot reach on a noisy VM.

Run: `python bench/bench_pipeline.py [--baseline-tree DIR]`; each tree runs in its own
process, alternately, `--rounds` times; medians of the per-round medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent


class InstantBackend:
    """Stands in for an engine: every request gets one token at once."""

    kind = "instant"
    identity = "instant"
    ready = True

    def __init__(self, variant: Any, metrics: Any) -> None:
        self.name = variant.name

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def prepare(self, request: Any) -> Any:
        return _types().PreparedRequest(request, "Hello", 1)

    async def generate(self, prepared: Any, context: Any = None) -> Any:
        types = _types()
        yield types.TokenEvent(1, "Hi", None)
        yield types.Generation("Hi", "length", "length", 1, 1)


@functools.cache
def _types() -> Any:
    try:  # trees before the pipeline issue
        import app.protocol as types  # type: ignore[import-not-found]
    except ImportError:
        import app.domain as types
    return types


def completion_call(asgi: Any, headers: list[tuple[bytes, bytes]]) -> Callable[[], Awaitable[None]]:
    """`POST /v1/completions` (greedy, 4 tokens) through the ASGI app, as a server would
    call it, with `headers` besides the usual."""
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    headers = [(b"host", b"gateway"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *headers]  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}  # fmt: skip

    async def one() -> None:
        replied = asyncio.Event()
        messages = [{"type": "http.request", "body": body.encode(), "more_body": False}]
        status = 0

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await replied.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            status = message.get("status", status)

        await asgi(dict(scope), receive, send)
        replied.set()
        assert status == 200, status

    return one


async def measure(requests: int) -> list[float]:
    """Microseconds per request, per batch of `requests`, after a warm-up."""
    from asgi_lifespan import LifespanManager

    import app.main
    from app.settings import Settings, VariantSettings

    app.main.create_backend = InstantBackend  # type: ignore[assignment]
    # Trees before tenancy have no `auth` setting.
    tenancy: dict[str, Any] = {"auth": "off"} if "auth" in Settings.model_fields else {}
    variants = [VariantSettings(name="m", model_path="-")]
    asgi = app.main.create_app(Settings(variants=variants, **tenancy))
    one = completion_call(asgi, [(b"cache-control", b"no-cache, no-store")])

    batches = []
    async with LifespanManager(asgi):
        for _ in range(500):
            await one()
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(requests):
                await one()
            batches.append(1e6 * (time.perf_counter() - started) / requests)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(args.requests))))
        return
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = args.baseline_tree.resolve()
    results: dict[str, list[float]] = {name: [] for name in trees}
    command = [sys.executable, str(Path(__file__).resolve()), "--child",
               "--requests", str(args.requests)]  # fmt: skip
    for _ in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree), "MODEL_GATEWAY_LOG_LEVEL": "warning"}
            out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True,
                                 check=True)  # fmt: skip
            batches = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(statistics.median(batches))
    for name, per_round in results.items():
        rounds = ", ".join(f"{v:.0f}" for v in per_round)
        print(f"{name}: median {statistics.median(per_round):.1f} µs/request (rounds: {rounds})")


if __name__ == "__main__":
    main()
