"""Turning user prompts into token ids, with the checks every front end shares."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vserve.frontend.tokenizer import Tokenizer
from vserve.protocol.sampling import SamplingParams

PromptInput = str | list[int] | dict[str, Any]


class PromptTooLongError(ValueError):
    pass


# Text tokenizes at well under this many characters per token except in odd corners (runs of
# spaces, long words); a longer prefix is the cheap first test of an over-long prompt.
_PROBE_CHARS_PER_TOKEN = 8


def encode_bounded(tokenizer: Tokenizer, text: str, add_special_tokens: bool,
                   max_model_len: int) -> list[int]:
    """``tokenizer.encode``, but a text that cannot fit in ``max_model_len`` tokens is
    refused (PromptTooLongError) without tokenizing all of it: an 8 MB prompt used to hold
    its API server's event loop for seconds and peak at 2 GB before being refused.

    Two cheap tests before the full encode: a text longer than ``max_model_len`` times the
    longest token (in characters, doubled for normalizers that shrink text) cannot fit;
    and a prefix of about ``8 * max_model_len`` characters that already tokenizes to more
    than ``max_model_len`` tokens proves the whole does not fit (a prefix's count exceeds
    the whole text's by at most one token, at the cut)."""
    bound = 2 * tokenizer.max_token_chars * max_model_len
    if len(text) > bound:
        raise PromptTooLongError(
            f"the prompt is {len(text)} characters long, more than this model's maximum "
            f"context length of {max_model_len} tokens can hold")
    probe = _PROBE_CHARS_PER_TOKEN * max_model_len
    if len(text) > probe:
        head = len(tokenizer.encode(text[:probe], add_special_tokens))
        if head - 1 >= max_model_len:
            raise PromptTooLongError(
                f"the prompt is more than {head - 1} tokens long, but this model's maximum "
                f"context length is {max_model_len} tokens (a prompt may use at most "
                f"{max_model_len - 1})")
    return tokenizer.encode(text, add_special_tokens)


def load_eos_token_ids(model_dir: Path, tokenizer: Tokenizer) -> list[int]:
    """EOS ids from generation_config.json and config.json, else the tokenizer's (no torch)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list):
                ids.extend(int(v) for v in value)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def tokenize_prompt(prompt: PromptInput, tokenizer: Tokenizer) -> tuple[str | None, list[int]]:
    """(text or None, token ids) for a string, a token-id list or {"prompt"|"prompt_token_ids"}."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return None, [int(t) for t in prompt]
    raise TypeError(f"unsupported prompt type {type(prompt).__name__}")


def check_prompt(
    token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int
) -> None:
    """Raise ValueError (PromptTooLongError for length) naming what is wrong."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= max_model_len:
        raise PromptTooLongError(
            f"the prompt is {n} tokens long, but this model's maximum context length is "
            f"{max_model_len} tokens (a prompt may use at most {max_model_len - 1})"
        )
    for t in token_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} in the prompt is outside the vocabulary "
                             f"(0..{vocab_size - 1})")


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Parameters of the index-th of n sequences: n=1 each, distinct seeds when seeded."""
    seed = None if params.seed is None else params.seed + index
    return params.clone(n=1, seed=seed)
