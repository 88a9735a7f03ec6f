"""What a shadow costs the primary: the same requests to four experiments of one gateway,
interleaved — no shadow; every request copied to a shadow that refuses connections; every
request copied to a shadow that accepts and never answers (copies pile up to the bound,
then are dropped); every request copied to a working local shadow on the same CPU. The
primary is the default model on CPU in all four.

Run: `python bench/bench_shadow.py` (default model, CPU).
"""

from __future__ import annotations

import argparse
import json
import socketserver
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import free_port, live_server, metric_value  # noqa: E402

MODEL_PATH = str(ROOT / "models" / "smollm2-135m-instruct")
STOP = threading.Event()


class Stalling(socketserver.BaseRequestHandler):
    """Passes health checks; holds every other request until the benchmark ends."""

    def handle(self) -> None:
        while not STOP.is_set():
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                head += chunk
            if not head.startswith(b"GET /health"):
                STOP.wait()
                return
            self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    stalling = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), Stalling)
    stalling.daemon_threads = True
    threading.Thread(target=stalling.serve_forever, daemon=True).start()
    stalled_url = f"http://127.0.0.1:{stalling.server_address[1]}"
    refused_url = f"http://127.0.0.1:{free_port()}"

    def local(name: str) -> dict[str, object]:
        return {"name": name, "model_path": MODEL_PATH, "inter_threads": 1}

    def shadow(name: str, url: str) -> dict[str, object]:
        return {"name": name, "backend": "openai", "upstream": {"replicas": [url]},
                "shadow": {"sample_rate": 1.0}}  # fmt: skip

    experiments = [
        {"name": "plain", "variants": [local("p")]},
        {"name": "dead", "variants": [local("d"), shadow("d-shadow", refused_url)]},
        {"name": "stalled", "variants": [local("s"), shadow("s-shadow", stalled_url)]},
        # A working shadow on the same CPU: the copy's compute is not free here.
        {
            "name": "local",
            "variants": [local("l"), {**local("l-shadow"), "shadow": {"sample_rate": 1.0}}],
        },
    ]
    env = {"experiments": json.dumps(experiments), "cache__enabled": "false",
           "log_level": "warning"}  # fmt: skip
    latency: dict[str, list[float]] = {e["name"]: [] for e in experiments}  # type: ignore[misc]
    with live_server(**env) as gateway, httpx.Client(timeout=120) as client:

        def ask(model: str) -> float:
            body = {"model": model, "prompt": "Tell me a story", "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            started = time.perf_counter()
            reply = client.post(gateway + "/v1/completions", json=body)
            elapsed = time.perf_counter() - started
            assert reply.status_code == 200, reply.text
            return elapsed

        for name in latency:  # warm-up
            ask(name)
        for _ in range(args.rounds):
            for name in latency:
                latency[name].append(ask(name))
        outcomes = {
            (shadow_name, outcome): metric_value(
                gateway, "model_gateway_shadow_comparisons_total", shadow=shadow_name,
                outcome=outcome)
            for shadow_name in ("d-shadow", "s-shadow", "l-shadow")
            for outcome in ("shadow_failed", "dropped", "match", "mismatch")
        }  # fmt: skip
    STOP.set()
    stalling.shutdown()

    base = statistics.median(latency["plain"])
    print(f"{args.rounds} rounds, {args.max_tokens} tokens, one client, interleaved")
    print(f"{'experiment':<10} {'p50 ms':>8} {'p90 ms':>8} {'p50 / plain':>12}")
    for name, values in latency.items():
        p50 = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"{name:<10} {p50 * 1000:8.1f} {p90 * 1000:8.1f} {p50 / base:12.3f}")
    print("shadow outcomes:", {f"{s} {o}": v for (s, o), v in outcomes.items() if v})


if __name__ == "__main__":
    main()
