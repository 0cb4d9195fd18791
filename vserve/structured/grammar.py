"""From a request's ``StructuredOutput`` to an llguidance grammar, and checking it.

Imported by API servers (no torch, no tokenizer): ``check`` compiles the grammar without a
tokenizer, which catches invalid JSON schemas, unsupported schema features, regexes and
grammars that do not parse, so a bad one is a 400 before any engine sees it. The engine
builds the same text with ``grammar_text`` and compiles it against its tokenizer.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llguidance import LLMatcher, grammar_from

from vserve.protocol.sampling import StructuredOutput

#: JSON is generated compact (no free whitespace): with flexible whitespace a model may emit
#: spaces and newlines forever, and output bounded by its schema would not terminate.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}


def json_schema(schema: dict[str, Any] | bool) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema, separators=(",", ":")))


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar of ``so`` (raises ValueError when the spec is not even
    well-formed: a schema that is not JSON, a choice list that is not a list of strings)."""
    if so.kind == "json":
        try:
            schema = json.loads(so.spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON schema must be an object (or true/false)")
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except json.JSONDecodeError:
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) for c in choices)):
            raise ValueError("choice must be a non-empty list of strings")
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices))
    if so.kind == "grammar":
        return grammar_from("grammar", so.spec)
    raise ValueError(f"unknown structured output kind {so.kind!r}")


@functools.lru_cache(maxsize=256)
def check(so: StructuredOutput) -> str | None:
    """Why ``so`` cannot be enforced, or None when it can. Cached: clients repeat schemas."""
    try:
        text = grammar_text(so)
    except ValueError as e:
        return str(e)
    error = LLMatcher.validate_grammar(text)
    if not error:
        return None
    return " ".join(error.split()) or "the grammar is not valid"
