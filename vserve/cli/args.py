"""The ``vserve serve`` parser, derived from the option declarations in ``vserve.config``.

Nothing here names an option: every flag, type, default, choice and help text comes from the
config dataclasses, so the CLI cannot drift from ``LLM(**kwargs)`` or from the configs the
processes receive.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from vserve.config import (
    ServeConfig,
    build_config,
    choices_of,
    format_size,
    option_fields,
    parse_size,
)

# Section class name → argument-group title in --help.
_GROUPS = {"ModelConfig": "model", "CacheConfig": "KV cache", "SchedulerConfig": "scheduler",
           "DeviceConfig": "device", "ParallelConfig": "parallelism", "ServerConfig": "HTTP"}


def _scalar_type(tp: Any) -> Any:
    """``int`` for ``int | None``, the element type for ``tuple[str, ...]``, …"""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    if origin is tuple:
        return _scalar_type(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    return tp


def _cli_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports a ValueError from a type function without its message; keep it."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if f.metadata.get("parse") is parse_size and isinstance(value, int):
        return format_size(value)
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_config_args(parser: argparse.ArgumentParser, config_cls: type = ServeConfig) -> None:
    """Add one argument per option of ``config_cls`` (grouped by section), dest = the
    option's field name."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    seen: set[str] = set()
    for section, f, tp in option_fields(config_cls):
        meta = f.metadata
        if f.name in seen:
            raise AssertionError(f"option {f.name} is declared twice")
        seen.add(f.name)
        title = _GROUPS.get(section.__name__, section.__name__)
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        help_text = meta.get("help", "")
        if meta.get("positional"):
            # Required, never defaulted: an option taking several values (--api-key,
            # --served-model-name, --allowed-*) placed before it would otherwise swallow
            # it and the server would start on the default instead.
            group.add_argument(f.name, metavar=f.name.upper(),
                               help=help_text + " (required; put it first: options that take "
                                                "several values would swallow it)")
            continue
        if "default:" not in help_text:  # some say what an unset default means themselves
            help_text += f" (default: {_default_text(f)})"
        flags = list(meta.get("flags") or ()) or ["--" + f.name.replace("_", "-")]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        scalar = _scalar_type(tp)
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            parse = meta.get("parse")
            kwargs["type"] = _cli_parser(parse) if parse is not None else scalar
            choices = choices_of(tp)
            if choices is not None:
                kwargs["choices"] = choices
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
            if choices is None:
                kwargs["metavar"] = meta.get("metavar") or flags[0].lstrip("-").replace(
                    "-", "_").upper()
        group.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace, config_cls: type = ServeConfig,
                     extra: dict[str, Any] | None = None) -> Any:
    """The typed config from parsed arguments (``extra`` overrides, e.g. env-given keys)."""
    names = {f.name for _, f, _ in option_fields(config_cls)}
    options = {name: getattr(args, name) for name in names}
    options.update(extra or {})
    return build_config(config_cls, options)
