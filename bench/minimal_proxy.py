"""The least a Python proxy can do for one completion: read the body, post it upstream with
aiohttp, return the answer. No validation, routing, metrics or streaming — a floor to read
the gateway's overhead against, run by `bench_gateway_overhead.py` (not for serving).

Run: `UPSTREAM=http://host:port uvicorn bench.minimal_proxy:app --port N`.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if _session is None:
        _session = aiohttp.ClientSession()
    headers = {"Content-Type": "application/json"}
    async with _session.post(UPSTREAM + scope["path"], data=body, headers=headers) as reply:
        answer = await reply.read()
        status = reply.status
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": answer})
