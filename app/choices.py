"""OpenAI choice objects as an upstream server writes them, kept whole on their way through
the gateway: stream deltas merged when several arrive at once, a reply body assembled from
a stream (a cache hit asked without `stream`), and stream chunks from a body (the reverse).

A choice is "plain" when it carries nothing but choice 0's text: those travel as text alone,
the fast path. Everything else (tool calls, logprobs, reasoning, several choices, a finish
reason, fields this server has never heard of) travels as the choice dicts themselves.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

Choice = dict[str, Any]

# String fields that arrive in pieces, one per stream event: concatenated when merged. Any
# other value of a later event replaces the earlier (ids, names, roles come once).
_PIECES = frozenset({"content", "text", "reasoning_content", "reasoning", "refusal", "arguments"})
_PLAIN_KEYS = frozenset({"index", "delta", "text", "logprobs", "finish_reason", "stop_reason"})
_NOT_PLAIN_IF_SET = frozenset({"logprobs", "stop_reason"})
_DELTA_KEYS = frozenset({"role", "content"})


def is_plain(choice: Mapping[str, Any], chat: bool) -> bool:
    """Only choice 0's text, no finish: relayable as text alone. (Once per streamed token:
    cheapest tests first.)"""
    if choice.get("index", 0) != 0 or choice.get("finish_reason") is not None:
        return False
    for key, value in choice.items():
        if value is not None and (key not in _PLAIN_KEYS or key in _NOT_PLAIN_IF_SET):
            return False
    if not chat:
        return True
    delta = choice.get("delta") or {}
    return all(value is None or key in _DELTA_KEYS for key, value in delta.items())


def text_of(choice: Mapping[str, Any], chat: bool) -> str:
    """The text a choice (a stream delta or a body's choice) adds."""
    if chat:
        part = choice.get("delta", choice.get("message")) or {}
        value = part.get("content") if isinstance(part, Mapping) else None
    else:
        value = choice.get("text")
    return value if isinstance(value, str) else ""


def _merge(into: Any, new: Any, key: str | None) -> Any:
    if new is None:
        return into
    if into is None:
        return copy.deepcopy(new)
    if key in _PIECES and isinstance(into, str) and isinstance(new, str):
        return into + new
    if isinstance(into, dict) and isinstance(new, Mapping):
        for k, v in new.items():
            into[k] = _merge(into.get(k), v, k)
        return into
    if isinstance(into, list) and isinstance(new, list):
        if key == "tool_calls":  # one entry per call, its pieces keyed by `index`
            by_index = {c.get("index"): c for c in into if isinstance(c, dict)}
            for call in new:
                known = by_index.get(call.get("index")) if isinstance(call, Mapping) else None
                if known is None:
                    into.append(copy.deepcopy(call))
                else:
                    _merge(known, call, None)
            return into
        return into + copy.deepcopy(new)  # logprobs entries, token lists
    return copy.deepcopy(new)


def logprobs_object(tokens: list[tuple[str, float]], offset: int, chat: bool) -> dict[str, Any]:
    """OpenAI's logprobs object for (text, log-probability) tokens whose text starts at
    character `offset` of the choice's text, without alternatives."""
    if chat:
        return {"content": [
            {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
            for text, lp in tokens
        ]}  # fmt: skip
    offsets = []
    for text, _ in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [text for text, _ in tokens],
        "token_logprobs": [lp for _, lp in tokens],
        "top_logprobs": [{text: lp} for text, lp in tokens],
        "text_offset": offsets,
    }


def stream_choice(
    index: int, text: str, chat: bool, logprobs: Any = None, finish_reason: str | None = None
) -> Choice:
    """One stream chunk's choice: `text` added to choice `index`."""
    choice: Choice = {"index": index}
    if chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    return choice


def merge_choices(events: Iterable[Iterable[Mapping[str, Any]]]) -> list[Choice]:
    """The choices of consecutive stream events as one event's, by index, in first-seen
    order: what a client reassembling the stream would get from the events one by one."""
    merged: dict[int, Choice] = {}
    for choices in events:
        for choice in choices:
            index = choice.get("index", 0)
            merged[index] = _merge(merged.get(index), choice, None)
    return list(merged.values())


def body_choices(stream_choices: list[Choice], chat: bool) -> list[Choice]:
    """A body's choices from the merged choices of a whole stream."""
    out = []
    for choice in stream_choices:
        choice = dict(choice)
        if chat:
            message = {"role": "assistant", "content": None, **choice.pop("delta", {})}
            if not message.get("tool_calls"):
                message.pop("tool_calls", None)
            else:  # stream deltas number the calls; a body's do not
                message["tool_calls"] = [
                    {k: v for k, v in c.items() if k != "index"} for c in message["tool_calls"]
                ]
            choice["message"] = message
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
        out.append(choice)
    return sorted(out, key=lambda c: int(c.get("index", 0)))


def stream_choices(body_choices: list[Choice], chat: bool) -> list[Choice]:
    """One stream chunk's choices carrying a whole body's choices."""
    out = []
    for choice in body_choices:
        choice = dict(choice)
        if chat:
            delta = dict(choice.pop("message", None) or {})
            calls = delta.get("tool_calls")
            if calls:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
            choice["delta"] = {k: v for k, v in delta.items() if v is not None}
        out.append(choice)
    return out


def is_plain_body(choices: list[Choice], chat: bool) -> bool:
    """A body that holds one choice of text alone (shaped by us as before, not relayed)."""
    if len(choices) != 1 or choices[0].get("index", 0) != 0:
        return False
    choice = choices[0]
    present = {k for k, v in choice.items() if v is not None}
    if choice.get("logprobs") is not None or not _PLAIN_KEYS.union({"message"}) >= present:
        return False
    message = choice.get("message") or {}
    return not chat or {"role", "content"} >= {k for k, v in message.items() if v not in (None, [])}


def comparable_output(
    text: str, body: Mapping[str, Any] | None, streamed: list[tuple[Choice, ...]]
) -> str:
    """Choice 0's output in the form shadow comparisons compare: its tool calls (function
    name and arguments, as canonical JSON) if it made any, else its text, as canonical JSON
    where it is a JSON document (key order and spacing are not a difference)."""
    calls: Any = None
    if body is not None:
        first: Mapping[str, Any] = next(
            (c for c in body.get("choices") or [] if c.get("index", 0) == 0), {}
        )
        message = first.get("message") or {}
        calls = message.get("tool_calls") if isinstance(message, Mapping) else None
    else:  # only the tool calls' deltas are merged: a stream's logprobs can be large
        deltas = [
            [{"index": 0, "delta": {"tool_calls": delta["tool_calls"]}}]
            for choices in streamed for c in choices
            if c.get("index", 0) == 0 and isinstance(delta := c.get("delta"), Mapping)
            and delta.get("tool_calls")
        ]  # fmt: skip
        if deltas:
            calls = merge_choices(deltas)[0]["delta"]["tool_calls"]
    if calls:
        return json.dumps(
            [{"name": (c.get("function") or {}).get("name"),
              "arguments": _json_or_text((c.get("function") or {}).get("arguments") or "")}
             for c in calls],
            sort_keys=True,
        )  # fmt: skip
    if text.lstrip()[:1] in ("{", "["):
        parsed = _json_or_text(text)
        if not isinstance(parsed, str):
            return json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    return text


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
