"""Upstream choices kept whole: stream deltas merged as a client reassembles them, a body
from a stream and back, and the output a shadow comparison compares."""

from __future__ import annotations

from typing import Any

from app.choices import (
    body_choices,
    comparable_output,
    is_plain,
    is_plain_body,
    merge_choices,
    stream_choices,
)

CALL_START = {"index": 0, "id": "call-1", "type": "function",
              "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip


def delta(index: int = 0, finish: str | None = None, logprobs: Any = None, **fields: Any) -> Any:
    return {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish}


def test_plain_choices_are_choice_zeros_text_alone() -> None:
    assert is_plain(delta(content="hi"), chat=True)
    assert is_plain(delta(role="assistant", content=""), chat=True)
    assert is_plain({"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}, False)
    assert not is_plain(delta(1, content="hi"), chat=True)
    assert not is_plain(delta(finish="stop"), chat=True)
    assert not is_plain(delta(logprobs={"content": []}, content="hi"), chat=True)
    assert not is_plain(delta(tool_calls=[CALL_START]), chat=True)
    assert not is_plain(delta(reasoning_content="hmm"), chat=True)
    assert not is_plain({**delta(content="hi"), "unknown": 1}, chat=True)


def test_deltas_merge_as_a_client_reassembles_them() -> None:
    events = [
        [delta(role="assistant", content="")],
        [delta(reasoning_content="think"), delta(1, content="B")],
        [delta(reasoning_content="ing", logprobs={"content": [{"token": "a"}]})],
        [delta(tool_calls=[CALL_START])],
        [delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])],
        [delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}},
                           {"index": 1, "id": "call-2", "function": {"name": "f"}}])],
        [delta(finish="tool_calls", logprobs={"content": [{"token": "b"}]})],
        [delta(1, finish="stop", content=".")],
    ]  # fmt: skip
    first, second = merge_choices(events)
    assert first["delta"]["reasoning_content"] == "thinking"
    assert first["delta"]["role"] == "assistant"
    calls = first["delta"]["tool_calls"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert [c["id"] for c in calls] == ["call-1", "call-2"]
    assert first["logprobs"]["content"] == [{"token": "a"}, {"token": "b"}]
    assert first["finish_reason"] == "tool_calls"
    assert (second["index"], second["delta"]["content"], second["finish_reason"]) == (
        1,
        "B.",
        "stop",
    )
    assert events[3][0]["delta"]["tool_calls"][0]["function"]["arguments"] == ""  # not mutated


def test_a_stream_becomes_a_body_and_a_body_a_stream() -> None:
    merged = merge_choices(
        [[delta(role="assistant", content="")], [delta(tool_calls=[CALL_START])],
         [delta(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}])],
         [delta(finish="tool_calls")]]
    )  # fmt: skip
    (choice,) = body_choices(merged, chat=True)
    assert choice["message"]["tool_calls"] == [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ]
    assert choice["finish_reason"] == "tool_calls"
    assert not is_plain_body([choice], chat=True)
    (back,) = stream_choices([choice], chat=True)
    assert back["delta"]["tool_calls"][0]["index"] == 0
    assert body_choices(merge_choices([[back]]), chat=True) == [choice]


def test_a_body_of_text_alone_is_plain() -> None:
    vllm_message = {"role": "assistant", "content": "Hi", "refusal": None, "tool_calls": [],
                    "reasoning_content": None}  # fmt: skip
    choice = {"index": 0, "message": vllm_message, "logprobs": None, "finish_reason": "stop",
              "stop_reason": None}  # fmt: skip
    assert is_plain_body([choice], chat=True)
    assert not is_plain_body([choice, {**choice, "index": 1}], chat=True)
    assert not is_plain_body([{**choice, "logprobs": {"content": []}}], chat=True)


def test_shadows_compare_tool_calls_and_json_by_structure() -> None:
    def body(arguments: str) -> dict[str, Any]:
        call = {"id": "x", "type": "function", "function": {"name": "f", "arguments": arguments}}
        return {"choices": [{"index": 0, "message": {"content": None, "tool_calls": [call]}}]}

    same = comparable_output("", body('{"a": 1, "b": 2}'), [])
    assert same == comparable_output("", body('{"b":2,"a":1}'), [])
    assert same != comparable_output("", body('{"a": 1, "b": 3}'), [])
    call = {**CALL_START, "function": {"name": "f", "arguments": '{"b": 2, "a": 1}'}}
    streamed = [(delta(tool_calls=[call]),)]
    assert comparable_output("", None, streamed) == same
    assert comparable_output('{"x": [1, 2]}', None, []) == comparable_output(
        '{ "x":[1,2] }', None, []
    )
    assert comparable_output("Paris.", None, []) == "Paris."
    assert comparable_output("{not json", None, []) == "{not json"
