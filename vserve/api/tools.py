"""Tool calling: the grammar of a forced tool choice, and reading tool calls out of text.

``tool_choice`` modes:

* ``none``: the tools are shown to the chat template; the output is content.
* ``required``: the output is constrained to a JSON array of ``{"name", "arguments"}``
  objects, one schema per tool (at most one item without ``parallel_tool_calls``), so every
  call names a given tool and its arguments validate against its ``parameters``.
* a named function: the output is constrained to that function's ``parameters`` schema and
  is the call's arguments.
* ``auto`` (``--enable-auto-tool-choice``): the model writes its own tool-call format, read
  by the parser ``--tool-call-parser`` names: ``hermes`` (``<tool_call>{json}</tool_call>``,
  Qwen2/Qwen3 and the demo model), ``llama3_json`` (the output is ``{"name", "parameters"}``
  objects separated by ``;``), ``mistral`` (``[TOOL_CALLS][{"name", "arguments"}, ...]``).

Every mode goes through a ``ToolStream``: ``feed`` takes the text as it is generated and
returns the content to show and OpenAI-shaped ``delta.tool_calls`` entries (a call's id and
name first, then fragments of its arguments); ``finish`` flushes. The non-streaming
response runs the same stream over the whole text, so both agree.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")

#: ``(content to show, tool-call deltas)``
Emitted = tuple[str, list[dict[str, Any]]]


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema ``tool_choice: required`` constrains the output to."""
    items = [{"type": "object",
              "properties": {"name": {"const": t["function"]["name"]},
                             "arguments": parameters_schema(t["function"])},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolStream:
    """Base: everything is content."""

    def __init__(self) -> None:
        self.num_calls = 0

    def _header(self, name: str) -> dict[str, Any]:
        self.num_calls += 1
        return {"index": self.num_calls - 1, "id": call_id(), "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _args(self, fragment: str) -> dict[str, Any]:
        return {"index": self.num_calls - 1, "function": {"arguments": fragment}}

    def _whole_call(self, name: str, arguments: Any) -> list[dict[str, Any]]:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                        ensure_ascii=False)
        return [self._header(name), self._args(text)]

    def feed(self, text: str) -> Emitted:
        return text, []

    def finish(self) -> Emitted:
        return "", []


class NamedToolStream(ToolStream):
    """The output is the arguments of one call to ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> Emitted:
        calls = [self._header(self.name)] if self.num_calls == 0 else []
        if text:
            calls.append(self._args(text))
        return "", calls

    def finish(self) -> Emitted:
        return ("", [self._header(self.name)]) if self.num_calls == 0 else ("", [])


# A call's head, once the first character of its arguments is there (so that whitespace
# before them is never taken for part of them).
_CALL_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


class RequiredToolStream(ToolStream):
    """The output is ``[{"name": ..., "arguments": {...}}, ...]`` (the grammar guarantees
    it): each call's name as soon as it is complete, then its arguments as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.pos = 0
        self.in_args = False
        self.depth = 0
        self.in_str = False
        self.escape = False

    def feed(self, text: str) -> Emitted:
        self.buf += text
        calls: list[dict[str, Any]] = []
        while True:
            if not self.in_args:
                m = _CALL_HEAD.search(self.buf, self.pos)
                if m is None:
                    break
                calls.append(self._header(json.loads(m.group(1))))
                self.pos = m.end()
                self.in_args, self.depth = True, 0
                continue
            start, i = self.pos, self.pos
            done = False
            while i < len(self.buf):
                c = self.buf[i]
                i += 1
                if self.in_str:
                    if self.escape:
                        self.escape = False
                    elif c == "\\":
                        self.escape = True
                    elif c == '"':
                        self.in_str = False
                elif c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        done = True
                        break
                elif self.depth == 0 and c in ",}":  # a scalar argument value ended
                    i -= 1
                    done = True
                    break
            if i > start:
                calls.append(self._args(self.buf[start:i]))
            self.pos = i
            if not done:
                break
            self.in_args = False
        return "", calls


class HermesToolStream(ToolStream):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""

    def feed(self, text: str) -> Emitted:
        self.buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            start = self.buf.find(self.OPEN)
            if start < 0:
                # Show all but a tail that could be the start of the opening tag.
                keep = next((k for k in range(min(len(self.OPEN) - 1, len(self.buf)), 0, -1)
                             if self.OPEN.startswith(self.buf[-k:])), 0)
                content.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            content.append(self.buf[:start])
            end = self.buf.find(self.CLOSE, start)
            if end < 0:
                self.buf = self.buf[start:]
                break
            body = self.buf[start + len(self.OPEN): end]
            self.buf = self.buf[end + len(self.CLOSE):]
            call = _parse_call(body, "arguments")
            if call is None:
                content.append(self.OPEN + body + self.CLOSE)
            else:
                calls += self._whole_call(*call)
        return "".join(content), calls

    def finish(self) -> Emitted:
        rest, self.buf = self.buf, ""
        return rest, []


class _WholeOutputToolStream(ToolStream):
    """Formats where the whole output is either tool calls (it starts with ``prefix``) or
    content: content streams through; tool calls are read at the end."""

    prefix = ""

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.mode: str | None = None  # "content" or "calls", once known

    def feed(self, text: str) -> Emitted:
        if self.mode == "content":
            return text, []
        self.buf += text
        head = self.buf.lstrip()
        if self.mode is None:
            if len(head) < len(self.prefix) and self.prefix.startswith(head):
                return "", []
            self.mode = "calls" if head.startswith(self.prefix) else "content"
            if self.mode == "content":
                out, self.buf = self.buf, ""
                return out, []
        return "", []

    def finish(self) -> Emitted:
        text, self.buf = self.buf, ""
        if self.mode != "calls":
            return text, []
        found = self.parse(text.strip())
        if found is None:
            return text, []
        calls: list[dict[str, Any]] = []
        for name, arguments in found:
            calls += self._whole_call(name, arguments)
        return "", calls

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        raise NotImplementedError


class Llama3JsonToolStream(_WholeOutputToolStream):
    prefix = "{"

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        found = []
        decoder = json.JSONDecoder()
        i = 0
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                return None
            call = _call_of(obj, "parameters") or _call_of(obj, "arguments")
            if call is None:
                return None
            found.append(call)
            while i < len(text) and text[i] in " \n\t;":
                i += 1
        return found or None


class MistralToolStream(_WholeOutputToolStream):
    prefix = "[TOOL_CALLS]"

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        try:
            items = json.loads(text[len(self.prefix):])
        except json.JSONDecodeError:
            return None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            return None
        found = [_call_of(item, "arguments") for item in items]
        return None if not found or any(c is None for c in found) else found  # type: ignore[return-value]


def _call_of(obj: Any, args_key: str) -> tuple[str, Any] | None:
    if (isinstance(obj, dict) and isinstance(obj.get("name"), str)
            and isinstance(obj.get(args_key, {}), dict)):
        return obj["name"], obj.get(args_key, {})
    return None


def _parse_call(body: str, args_key: str) -> tuple[str, Any] | None:
    try:
        return _call_of(json.loads(body), args_key)
    except json.JSONDecodeError:
        return None


AUTO_STREAMS: dict[str, type[ToolStream]] = {
    "hermes": HermesToolStream,
    "llama3_json": Llama3JsonToolStream,
    "mistral": MistralToolStream,
}


def collect(stream: ToolStream, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Run ``stream`` over a whole output: (content or None, complete tool calls)."""
    content, deltas = stream.feed(text)
    more, tail = stream.finish()
    content += more
    calls: list[dict[str, Any]] = []
    for d in deltas + tail:
        if "id" in d:
            calls.append({"id": d["id"], "type": "function",
                          "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return (content or None), calls
