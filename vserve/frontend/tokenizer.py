"""A light tokenizer wrapper: ``tokenizers`` + jinja2 chat templates, no torch, no transformers.

API server processes tokenize and render chat templates on every request, and they must start
fast and stay small, so the normal path imports only ``tokenizers`` and ``jinja2``. A checkpoint
without ``tokenizer.json`` falls back to ``transformers.AutoTokenizer`` behind the same interface
(that path imports transformers, and with it usually torch).

Compatibility with Hugging Face (transformers 5): ``encode``/``decode`` equal
``AutoTokenizer``'s; ``apply_chat_template`` renders exactly as ``apply_chat_template(...,
tokenize=False)`` does (same sandboxed environment, globals and filters, ``None``-valued message
keys dropped). Deliberate differences:

* message ``content`` given as a list of text parts is joined with ``"\\n"`` into one string
  before rendering (vLLM's "string" content format); non-text parts are rejected;
* ``all_special_ids`` holds every added token marked special (what ``skip_special_tokens``
  skips), not only the named ones;
* ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json`` apply only when
  ``tokenizer.json`` has no post-processor (otherwise the post-processor is authoritative, as in
  transformers 5);
* the config wins over ``special_tokens_map.json``, which only fills in missing tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2
from tokenizers import Tokenizer as _HFTokenizersTokenizer
from tokenizers import processors

from vserve.frontend.chat_template import compile_template, normalize_message, to_plain

# HF's named special tokens: the chat template sees each one the config sets.
_SPECIAL_TOKEN_NAMES = tuple(
    f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
)
# The chars a literal template has and a file path hardly ever has (vLLM's heuristic).
_JINJA_CHARS = "{}\n"


class _Backend(Protocol):
    vocab_size: int
    special_ids: set[int]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool, clean_up: bool) -> str: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def token_to_id(self, token: str) -> int | None: ...


def _clean_up_tokenization(text: str) -> str:
    """HF's ``clean_up_tokenization``: meant for WordPiece, destructive for BPE."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")):
        text = text.replace(a, b)
    for suffix in ("n't", "'m", "'s", "'ve", "'re"):
        text = text.replace(" " + suffix, suffix)
    return text


class _FastBackend:
    """``tokenizers.Tokenizer`` loaded from ``tokenizer.json``."""

    def __init__(self, tok: _HFTokenizersTokenizer) -> None:
        # A server must neither truncate nor pad a prompt behind the caller's back.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # HF skips the clean-up for BPE models: it would strip real spaces before punctuation.
        self._cleanup_allowed = type(tok.model).__name__ != "BPE"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool, clean_up: bool) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if clean_up and self._cleanup_allowed else text

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if token_id >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def set_template_post_processor(self, bos: int | None, eos: int | None) -> None:
        single = " ".join(
            ([f"{self.id_to_token(bos)}:0"] if bos is not None else [])
            + ["$A:0"]
            + ([f"{self.id_to_token(eos)}:0"] if eos is not None else [])
        )
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        specials = [(self.id_to_token(i) or "", i) for i in (bos, eos) if i is not None]
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    @property
    def has_post_processor(self) -> bool:
        return self._tok.post_processor is not None


class _TransformersBackend:
    """Fallback for checkpoints without ``tokenizer.json``: wraps ``AutoTokenizer``."""

    def __init__(self, hf: Any) -> None:
        self._hf = hf
        self.vocab_size = len(hf)
        self.special_ids = set(hf.all_special_ids) | {
            i for i, t in hf.added_tokens_decoder.items() if t.special
        }

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool, clean_up: bool) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]  # as tokenizers does: unknown ids → ""
        return str(
            self._hf.decode(
                ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up
            )
        )

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        tok = self._hf.convert_ids_to_tokens(token_id)
        return None if tok is None else str(tok)

    def token_to_id(self, token: str) -> int | None:
        tid = self._hf.convert_tokens_to_ids(token)
        return tid if isinstance(tid, int) and self.id_to_token(tid) == token else None


def _token_str(value: object) -> str | None:
    """A special token from a config: a string or an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def load_chat_template(value: str | Path) -> str:
    """A ``--chat-template`` value: a file path, or a literal Jinja template.

    A ``Path`` must be a readable file. A string naming an existing file is read; otherwise it
    is taken literally when it contains ``{``, ``}`` or a newline, and rejected (ValueError) as
    a path that does not exist when it does not.
    """
    path = Path(value).expanduser()
    if isinstance(value, Path) or path.is_file():
        return path.read_text(encoding="utf-8")
    if not any(c in value for c in _JINJA_CHARS):
        raise ValueError(f"chat template {value!r} looks like a file path, but no such file")
    return value


class Tokenizer:
    """Encode, decode and render chat templates for one model.

    Attributes: ``bos_token``/``eos_token`` (str or None) and their ``*_id``; ``special_tokens``
    (the named ones, e.g. ``{"bos_token": "<s>"}``); ``all_special_ids``; ``chat_template`` and
    ``named_chat_templates``; ``model_max_length`` (None when the config has none or HF's
    "unlimited" sentinel). Read-only after construction, so safe to share between threads.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        named_chat_templates: Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
        name_or_path: str = "",
    ) -> None:
        self._backend = backend
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.named_chat_templates: dict[str, str] = dict(named_chat_templates or {})
        self.chat_template: str | None = chat_template
        if chat_template is None:
            self.chat_template = self.named_chat_templates.get("default")
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        self.eos_token_id = None if self.eos_token is None else backend.token_to_id(self.eos_token)
        named_ids = {backend.token_to_id(t) for t in self.special_tokens.values()}
        self.all_special_ids: set[int] = backend.special_ids | {
            i for i in named_ids if i is not None
        }

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load from a local directory (``tokenizer.json`` + configs).

        ``chat_template`` (a file path or a literal template, see ``load_chat_template``)
        overrides the checkpoint's. Without ``tokenizer.json`` this imports transformers.
        """
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        override = None if chat_template is None else load_chat_template(chat_template)
        if not (directory / "tokenizer.json").is_file():
            return cls._from_transformers(directory, override)

        config = _read_json(directory / "tokenizer_config.json")
        special: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            tok = _token_str(config.get(name))
            if tok is not None:
                special[name] = tok
        for name, value in _read_json(directory / "special_tokens_map.json").items():
            tok = _token_str(value)
            if name in _SPECIAL_TOKEN_NAMES and tok is not None:
                special.setdefault(name, tok)

        named: dict[str, str] = {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {str(t["name"]): str(t["template"]) for t in template}
            template = None
        extra_dir = directory / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                named[f.stem] = f.read_text(encoding="utf-8")
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():  # a standalone template file wins over the config's
            template = jinja_file.read_text(encoding="utf-8")
        if override is not None:
            template = override

        backend = _FastBackend(_HFTokenizersTokenizer.from_file(str(directory / "tokenizer.json")))
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if not backend.has_post_processor and (add_bos or add_eos):
            ids = {n: backend.token_to_id(special.get(n, "")) for n in ("bos_token", "eos_token")}
            backend.set_template_post_processor(
                ids["bos_token"] if add_bos else None, ids["eos_token"] if add_eos else None
            )
        max_len = config.get("model_max_length")
        return cls(
            backend,
            special_tokens=special,
            chat_template=template if isinstance(template, str) else None,
            named_chat_templates=named,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=max_len if isinstance(max_len, int) and max_len < 1 << 40 else None,
            name_or_path=str(path),
        )

    @classmethod
    def _from_transformers(cls, directory: Path, chat_template: str | None) -> Tokenizer:
        from transformers import AutoTokenizer  # heavy; only for checkpoints lacking tokenizer.json

        hf = AutoTokenizer.from_pretrained(str(directory))
        template = hf.chat_template
        if chat_template is not None or not isinstance(template, str):
            template = chat_template
        special = hf.special_tokens_map.items()
        return cls(
            _TransformersBackend(hf),
            special_tokens={k: str(v) for k, v in special if k in _SPECIAL_TOKEN_NAMES},
            chat_template=template,
            named_chat_templates=dict(hf.chat_template)
            if isinstance(hf.chat_template, dict)
            else {},
            clean_up_tokenization_spaces=bool(hf.clean_up_tokenization_spaces),
            model_max_length=hf.model_max_length if hf.model_max_length < 1 << 40 else None,
            name_or_path=str(directory),
        )

    # -- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.vocab_size

    def __len__(self) -> int:
        return self._backend.vocab_size

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's text, in characters (at least 1): a text of C characters
        needs at least C / this many tokens."""
        longest = 1
        for token_id in range(self.vocab_size):
            token = self.id_to_token(token_id)
            if token is not None and len(token) > longest:
                longest = len(token)
        return longest

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. bos).

        Encode a rendered chat template with ``add_special_tokens=False``: templates already
        contain the bos token.
        """
        return self._backend.encode(text, add_special_tokens)

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of ``ids``; ids the tokenizer does not know (padded vocab rows) decode to "".

        ``clean_up_tokenization_spaces`` defaults to the config's (and, as in HF, never applies
        to BPE models).
        """
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return self._backend.decode(ids, skip_special_tokens, clean)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level form), None if unknown."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of ``ids``; an unknown id gives ""."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    # -- chat templates -------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **extra_kwargs: Any,
    ) -> str:
        """Render ``messages`` with the chat template (``chat_template``: a literal template or
        the name of one of the checkpoint's named templates; default: the checkpoint's).

        The template sees ``messages``, ``add_generation_prompt``, ``tools``/``documents``
        (None unless given), the named special tokens (``bos_token``, ``eos_token``, ...), and
        ``extra_kwargs`` (which win). Raises ValueError when there is no template, when a
        message is malformed or has non-text content parts, and when rendering fails (the
        template's own ``raise_exception`` included); the message says why.
        """
        template = self._resolve_template(chat_template, extra_kwargs.get("tools"))
        chat = [normalize_message(i, m) for i, m in enumerate(messages)]
        variables: dict[str, Any] = {"tools": None, "documents": None}
        variables.update(self.special_tokens)
        variables.update(to_plain(extra_kwargs))
        variables["messages"] = chat
        variables["add_generation_prompt"] = add_generation_prompt
        compiled = compile_template(template)
        try:
            return compiled.render(**variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e.message or e}") from e
        except Exception as e:  # a template that fails on these inputs is a bad request
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e

    def _resolve_template(self, chat_template: str | None, tools: object) -> str:
        if chat_template is not None:
            return self.named_chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.named_chat_templates:
            return self.named_chat_templates["tool_use"]
        if self.chat_template is None:
            names = sorted(self.named_chat_templates)
            known = f" (named templates: {', '.join(names)})" if names else ""
            raise ValueError(
                f"tokenizer {self.name_or_path!r} has no chat template{known}; pass --chat-template"
            )
        return self.chat_template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
