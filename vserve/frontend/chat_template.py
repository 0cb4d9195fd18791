"""Chat template rendering for ``Tokenizer.apply_chat_template``: a sandboxed jinja2
environment matching transformers' (same globals and filters), stricter on unsafe access.

Split out of ``tokenizer.py``, whose ``Tokenizer`` is the entry point; it uses
``normalize_message``, ``to_plain`` and ``compile_template``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Message fields a reasoning trace may come under; templates read the first (HF v5 aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def to_plain(value: Any) -> Any:
    """A copy made of plain JSON-like types, so the template sees no methods but builtins'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) may carry methods; reduce them to the base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return to_plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_message(index: int, message: object) -> dict[str, Any]:
    """A plain copy of ``message``: None-valued keys dropped (as HF v5 does), list content
    joined into one string (text parts, ``"\\n"``-separated), reasoning fields aliased."""
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
    msg: dict[str, Any] = {k: v for k, v in to_plain(message).items() if v is not None}
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(
                    f"messages[{index}]: content part of type {kind!r} is not supported "
                    "(only text parts are)"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}]: a text part needs a string 'text'")
            texts.append(part["text"])
        msg["content"] = "\n".join(texts)
    reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """``dict`` for templates, without the type's attributes (as HF exposes it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` refusing underscore attributes, which would reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: no HTML escaping (jinja's built-in escapes <, >, & and ').
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SandboxedEnvironment(ImmutableSandboxedEnvironment):
    """Raises on unsafe attribute access (``__class__``, ``__globals__``, ``append`` ...).

    Jinja's default returns an undefined that renders as "" and fails only when used further;
    a template reaching for internals is hostile or broken, so it fails at once.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Matches transformers' chat template environment (plus the stricter unsafe access): the
    # sandbox blocks internals and the immutable variant blocks mutating lists and dicts.
    env = _SandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e.message or e}") from e
