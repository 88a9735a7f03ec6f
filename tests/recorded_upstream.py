"""A stand-in for vLLM, which cannot run here: it answers each request with the body or the
Server-Sent Events that a real vLLM (0.26, the default model's weights) sent for the same
request, byte for byte, and keeps what it was sent. The recordings were made on the GPU
machine by `bench/gpu/quant_vllm.sh` (`tests/fixtures/vllm_replies.json` holds the POST
records of its `vllm_fixtures.json`, less their headers and timings: the 200s are replayed,
the refusals kept for reference). A request no recording matches gets a plain
text reply."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.stub_upstream import StubUpstream, json_response

RECORDINGS = Path(__file__).parent / "fixtures" / "vllm_replies.json"
# What a recording is matched on: the request's content and the options that shape a reply
# (of `response_format` only its type: a client library spells a schema its own way).
OPTIONS = ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "n", "echo")


def recordings() -> list[dict[str, Any]]:
    return [r for r in json.loads(RECORDINGS.read_text()) if r.get("status") == 200]


def _key(path: str, request: dict[str, Any]) -> str:
    if isinstance(request.get("response_format"), dict):
        request = {**request, "response_format": request["response_format"].get("type")}
    fields = {
        "content": request.get("messages", request.get("prompt")),
        "stream": bool(request.get("stream")),
        "options": {k: request[k] for k in OPTIONS if request.get(k) not in (None, False, 1)},
    }
    return path + json.dumps(fields, sort_keys=True)


PLAIN = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": " ok", "message": {"role": "assistant", "content": "ok"},
                      "logprobs": None, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


class RecordedUpstream(StubUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []  # the payloads, as sent by the gateway
        self._replies = {_key(r["endpoint"], r["request"]): r for r in recordings()}

    async def _answer(self, path: str, payload: Any, writer: asyncio.StreamWriter) -> None:
        self.received.append(payload)
        recorded = self._replies.get(_key(path, payload))
        if recorded is not None and "sse" in recorded:
            data = recorded["sse"].encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
        else:
            body = recorded["body_text"] if recorded is not None else json.dumps(PLAIN)
            writer.write(json_response(body.encode()))
