"""Structured outputs and tool calling through the official ``openai`` client, against a
real ``vserve serve demo --enable-auto-tool-choice --tool-call-parser hermes``.

The demo model's weights are random, so every guarantee here comes from the grammar: over
many seeds, outputs parse and validate against their schema (``jsonschema``), regexes and
choices match, forced tool calls name a given tool with valid arguments — streamed or not.
Bad constraints are 400s naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from helpers.serve import ServeProcess, serve

SEEDS = range(12)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "alerts": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90,
                                                            "maximum": 90}},
                  "required": ["lat"], "additionalProperties": False},
    },
    "required": ["city", "unit", "days", "alerts", "where"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                               "maximum": 999},
                                          "b": {"type": "integer", "minimum": 0,
                                                "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--api-server-count", "2", "--enable-auto-tool-choice",
               "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_json_schema_always_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER,
                                                  "strict": True}}
    for seed in SEEDS:
        r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=200,
                                           seed=seed, n=2, response_format=fmt)  # type: ignore[arg-type]
        for choice in r.choices:
            assert choice.finish_reason == "stop", (seed, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content or ""), WEATHER)


def test_json_schema_on_completions_and_streamed(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    r = client.completions.create(model="demo", prompt="Weather:", max_tokens=200, seed=5,
                                  extra_body={"response_format": fmt})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), WEATHER)
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=200,
                                            seed=6, stream=True, response_format=fmt)  # type: ignore[arg-type]
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), WEATHER)


def test_json_object(client: openai.OpenAI) -> None:
    """Any JSON object: strings are unbounded, so a random model may run out of tokens;
    every output that stops is an object, and most do."""
    stopped = 0
    for seed in SEEDS:
        r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=200,
                                           seed=seed, response_format={"type": "json_object"})
        choice = r.choices[0]
        text = choice.message.content or ""
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            stopped += 1
    assert stopped >= len(SEEDS) // 3, stopped


def test_vllm_structured_outputs(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        body = {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}"}}
        r = client.completions.create(model="demo", prompt="Code:", max_tokens=20, seed=seed,
                                      extra_body=body)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.choices[0].text), r.choices[0].text
        body = {"structured_outputs": {"choice": ["red", "green", "blue"]}}
        r = client.completions.create(model="demo", prompt="Color:", max_tokens=20, seed=seed,
                                      extra_body=body)
        assert r.choices[0].text in ("red", "green", "blue")
        assert r.choices[0].finish_reason == "stop"
    grammars = {
        "lark": 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/',
        "gbnf": 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?',
    }
    for grammar in grammars.values():
        r = client.completions.create(model="demo", prompt="Sum:", max_tokens=60, seed=3,
                                      extra_body={"structured_outputs": {"grammar": grammar}})
        text = r.choices[0].text
        if r.choices[0].finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text
        else:
            assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*", text), text
    r = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=200, seed=1,
        extra_body={"structured_outputs": {"json": SCHEMAS["add"]}})
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMAS["add"])


def _check_calls(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=300,
                                           seed=seed, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", seed
        assert choice.message.content is None
        _check_calls(choice.message.tool_calls, set(SCHEMAS))
    named = {"type": "function", "function": {"name": "add"}}
    for seed in SEEDS:
        r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=100,
                                           seed=seed, tools=TOOLS, tool_choice=named)  # type: ignore[arg-type]
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        calls = choice.message.tool_calls
        assert calls and len(calls) == 1 and calls[0].function.name == "add"
        _check_calls(calls, {"add"})
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=300, seed=2,
                                       tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                       parallel_tool_calls=False, n=4)
    for choice in r.choices:
        assert len(choice.message.tool_calls or []) == 1


def _streamed_calls(stream: Any) -> tuple[dict[int, dict[str, Any]], str | None, list[str]]:
    calls: dict[int, dict[str, Any]] = {}
    order: list[str] = []
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None and not call["arguments"], "the id comes first"
                    call["id"], call["name"] = d.id, d.function.name
                    order.append("name")
                if d.function and d.function.arguments:
                    assert call["name"] is not None, "arguments before the name"
                    call["arguments"] += d.function.arguments
                    order.append("args")
    return calls, finish, order


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    for seed in range(4):
        stream = client.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=300, seed=seed, tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required", stream=True)
        calls, finish, order = _streamed_calls(stream)
        assert finish == "tool_calls" and calls
        assert order.count("args") > len(calls), "arguments arrive in fragments"
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        # The same request without streaming gives the same calls.
        r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=300,
                                           seed=seed, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
        got = [(c.function.name, json.loads(c.function.arguments))
               for c in r.choices[0].message.tool_calls or []]
        assert got == [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    stream = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=100, seed=9, tools=TOOLS, stream=True,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}})
    calls, finish, order = _streamed_calls(stream)
    assert finish == "stop" and list(calls) == [0] and order[0] == "name"
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["add"])


def test_auto_and_none_and_tool_history(client: openai.OpenAI) -> None:
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    for choice_mode in ("auto", "none", None):
        kw: dict[str, Any] = {} if choice_mode is None else {"tool_choice": choice_mode}
        r = client.chat.completions.create(model="demo", messages=history, max_tokens=20,  # type: ignore[arg-type]
                                           seed=1, tools=TOOLS, **kw)  # type: ignore[arg-type]
        choice = r.choices[0]
        # The random model writes no <tool_call>: content, and the prompt held the history.
        assert choice.message.tool_calls is None and choice.finish_reason == "length"
        assert r.usage and r.usage.prompt_tokens > 100


def test_bad_constraints_are_400_naming_the_field(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: ("}}},
         "structured_outputs.grammar"),
        ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}},
         "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"whitespace_pattern": " "}}},
         "structured_outputs.whitespace_pattern"),
        ({"extra_body": {"structured_outputs": {"regex": "a"}},
          "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "frob"}}}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)  # type: ignore[index]
    # Nothing was left behind: the server still serves a constrained request.
    r = client.completions.create(model="demo", prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"choice": ["ok"]}})
    assert r.choices[0].text == "ok"
