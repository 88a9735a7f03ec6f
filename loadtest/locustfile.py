"""Load scenarios for model-gateway (or any OpenAI-compatible server).

    locust -f loadtest/locustfile.py --host http://localhost:8000        # web UI
    make load USERS=32 DURATION=2m                                       # headless, CSV + HTML

User classes (all run by default, in proportion to their weights; name some to pick):
ChatUser and CompletionUser (one JSON reply each), StreamingChatUser (SSE; reports the time
to the first token and to the end of the stream as request types "TTFT" and "STREAM"),
CacheHeavyUser (a few greedy prompts, repeated: answered from the response cache), ABUser
(sticky users with X-User-Id; counts replies per variant from X-Variant).

Settings by environment: MODEL (default smollm2-135m-instruct), MAX_TOKENS (default 32),
API_KEY (sent as `Authorization: Bearer`, for a gateway that requires keys).
Generated tokens are counted from `usage` and written with the run's duration to
<csv prefix>_tokens.json (or loadtest/results/tokens.json).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "32"))
API_KEY = os.environ.get("API_KEY")
PROMPTS = [
    line.strip()
    for line in (Path(__file__).parent / "prompts.txt").read_text().splitlines()
    if line.strip()
]
TOKENS: Counter[str] = Counter()
VARIANTS: Counter[str] = Counter()
STARTED = time.monotonic()


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, **extra}  # fmt: skip


class _Generating(HttpUser):
    abstract = True
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def post_json(self, path: str, body: dict[str, Any], name: str, **headers: str) -> None:
        with self.client.post(path, json=body, headers=headers, name=name,
                              catch_response=True) as reply:  # fmt: skip
            if reply.status_code != 200:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
                return
            try:
                TOKENS[name] += reply.json()["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError) as exc:
                reply.failure(f"unexpected body: {exc}")
                return
            if "x-variant" in reply.headers:
                VARIANTS[reply.headers["x-variant"]] += 1


class ChatUser(_Generating):
    weight = 3

    @task
    def chat(self) -> None:
        self.post_json("/v1/chat/completions", chat_body(random.choice(PROMPTS)), "chat")


class CompletionUser(_Generating):
    weight = 1

    @task
    def complete(self) -> None:
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS}
        self.post_json("/v1/completions", body, "completion")


class StreamingChatUser(_Generating):
    weight = 3

    @task
    def chat_stream(self) -> None:
        body = chat_body(random.choice(PROMPTS), stream=True,
                         stream_options={"include_usage": True})  # fmt: skip
        started = time.perf_counter()
        first: float | None = None
        with self.client.post("/v1/chat/completions", json=body, name="chat (stream)",
                              stream=True, catch_response=True) as reply:  # fmt: skip
            if reply.status_code != 200:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
                return
            done = False
            for line in reply.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    reply.failure(f"error event: {chunk['error']}")
                    return
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content and first is None:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    TOKENS["chat (stream)"] += chunk["usage"]["completion_tokens"]
            if not done:
                reply.failure("the stream ended without [DONE]")
                return
        # Locust times a streamed request to its headers; report the whole stream and its
        # first token as request types of their own.
        total = time.perf_counter() - started
        for request_type, seconds in (("STREAM", total), ("TTFT", first)):
            if seconds is not None:
                events.request.fire(request_type=request_type, name="chat (stream)",
                                    response_time=seconds * 1000, response_length=0,
                                    exception=None, context={})  # fmt: skip


class CacheHeavyUser(_Generating):
    """Repeated greedy prompts: after the first of each, the cache answers."""

    weight = 2

    @task
    def cached(self) -> None:
        body = chat_body(random.choice(PROMPTS[:3]), temperature=0)
        self.post_json("/v1/chat/completions", body, "chat (greedy, repeated)")


class ABUser(_Generating):
    """A sticky user of an A/B experiment: the same X-User-Id for the user's whole run."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.user_id = f"load-{random.getrandbits(48):012x}"

    @task
    def chat_as_user(self) -> None:
        self.post_json("/v1/chat/completions", chat_body(random.choice(PROMPTS)), "chat (A/B)",
                       **{"X-User-Id": self.user_id})  # fmt: skip


@events.test_stop.add_listener
def write_tokens(environment: Any, **_: Any) -> None:
    """Generated tokens and tokens/s of the run, next to locust's own CSV files."""
    options = environment.parsed_options
    prefix = getattr(options, "csv_prefix", None) if options else None
    path = Path(f"{prefix}_tokens.json") if prefix else Path("loadtest/results/tokens.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = time.monotonic() - STARTED
    summary = {"duration_s": round(duration, 1), "tokens": dict(TOKENS),
               "tokens_per_s": round(sum(TOKENS.values()) / duration, 1),
               "variants": dict(VARIANTS)}  # fmt: skip
    path.write_text(json.dumps(summary, indent=1))
