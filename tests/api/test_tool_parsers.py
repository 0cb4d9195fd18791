"""Reading tool calls out of generated text (``vserve.api.tools``), fed whole and one
character at a time: the streamed deltas assemble into the same calls, a call's id and name
come before its arguments, and content around calls is kept."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from vserve.api.tools import (
    HermesToolStream,
    Llama3JsonToolStream,
    MistralToolStream,
    NamedToolStream,
    RequiredToolStream,
    ToolStream,
    collect,
    required_schema,
)


def _by_char(make: Callable[[], ToolStream], text: str) -> tuple[str, list[dict[str, Any]]]:
    stream = make()
    content, calls = "", []
    for ch in text:
        c, d = stream.feed(ch)
        content += c
        calls += d
    c, d = stream.finish()
    content += c
    calls += d
    assembled: list[dict[str, Any]] = []
    for delta in calls:
        if "id" in delta:
            assert delta["index"] == len(assembled)
            assembled.append({"name": delta["function"]["name"], "arguments": ""})
        else:
            assert delta["index"] == len(assembled) - 1, "arguments of the current call"
            assembled[-1]["arguments"] += delta["function"]["arguments"]
    return content, assembled


def _whole(make: Callable[[], ToolStream], text: str) -> tuple[str | None, list[Any]]:
    content, calls = collect(make(), text)
    return content, [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in calls]


CASES: list[tuple[str, Callable[[], ToolStream], str, str, list[tuple[str, Any]]]] = [
    ("hermes", HermesToolStream,
     'Let me check. <tool_call>{"name": "f", "arguments": {"a": "x<y"}}</tool_call>'
     '<tool_call>{"name": "g", "arguments": {}}</tool_call> done <tool',
     "Let me check.  done <tool", [("f", {"a": "x<y"}), ("g", {})]),
    ("hermes-bad-json", HermesToolStream, "a <tool_call>{nope}</tool_call>",
     "a <tool_call>{nope}</tool_call>", []),
    ("llama3", Llama3JsonToolStream,
     ' {"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": [2]}}', "",
     [("f", {"a": 1}), ("g", {"b": [2]})]),
    ("llama3-content", Llama3JsonToolStream, "plain {text}", "plain {text}", []),
    ("mistral", MistralToolStream,
     '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', "",
     [("f", {"a": 1}), ("g", {})]),
    ("mistral-content", MistralToolStream, "[TOOL is not a call", "[TOOL is not a call", []),
    ("required", RequiredToolStream,
     '[{"name": "f", "arguments": {"s": "}]\\"{", "n": [1, {"x": 2}]}}, '
     '{"name": "g", "arguments": {}}]', "", [("f", {"s": '}]"{', "n": [1, {"x": 2}]}),
                                              ("g", {})]),
    ("named", lambda: NamedToolStream("f"), '{"a": [1, 2]}', "", [("f", {"a": [1, 2]})]),
]


@pytest.mark.parametrize("name,make,text,content,expected", CASES, ids=[c[0] for c in CASES])
def test_parsers_whole_and_streamed(name: str, make: Callable[[], ToolStream], text: str,
                                    content: str, expected: list[tuple[str, Any]]) -> None:
    for got_content, calls in (_by_char(make, text), _whole(make, text)):
        assert (got_content or "") == content, name
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected, name


def test_required_schema_bounds_the_calls() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    schema = required_schema(tools, parallel=False)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["f", "g"]
    assert "maxItems" not in required_schema(tools, parallel=True)
