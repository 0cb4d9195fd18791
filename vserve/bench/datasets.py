"""Benchmark prompts: random prompts of exact token lengths, or prompts from a JSONL file.

Random prompts are windows of a token pool made from random English words: a window of ``k``
tokens is decoded to text, the text is counted the way the server counts a prompt
(``prompt_tokens``: with the BOS a completion adds, or the chat template around a user
message), and ``k`` is corrected until the count is exactly the asked length (a few rounds;
word merges at the window's edges move the count by a token or two). Counting uses a local
tokenizer (``--tokenizer``) or the server's ``/tokenize`` and ``/detokenize`` (vLLM's and
vserve's shape). Without either, prompts are built from words with a tokens-per-word ratio
measured by two probe requests, and the report's token counts come from ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Common English words: they make prompts that look like text to any tokenizer.
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not first one their its new after but who they have two been other when "
    "there all during into school time may years more most only over city some world would "
    "where later up such used many can state about national out known university united then "
    "made also team part under music would while its three season between film well following "
    "history life war both american game small each high people because since early before "
    "including number several series through around same second west county company work "
    "north south east large river album family group public released being called until "
    "however against long another home member became station line district local top form "
    "based although within four last still took government named played year days back old "
    "water light house field market garden winter summer morning evening question answer "
    "story paper table window letter number simple strong quiet bright green yellow orange "
    "purple silver golden wooden stone mountain valley island forest ocean desert village"
).split()


@dataclass(slots=True)
class BenchPrompt:
    """One request's input: a completion prompt or chat messages, and its lengths.

    ``prompt_len`` is the builder's count of prompt tokens (-1 when unknown); the report uses
    the server's ``usage`` when there is one.
    """

    prompt: str | list[dict[str, Any]]
    prompt_len: int
    output_len: int


class TokenCounter(Protocol):
    """Counts prompts the way the server does, and encodes/decodes plain text."""

    async def count(self, text: str) -> int: ...
    async def encode_plain(self, text: str) -> list[int]: ...
    async def decode(self, ids: list[int]) -> str: ...


class LocalCounter:
    """A local tokenizer directory (vserve's Tokenizer: tokenizer.json, no torch)."""

    def __init__(self, path: str, chat: bool, chat_template: str | None = None) -> None:
        from vserve.frontend.tokenizer import Tokenizer

        self.tok = Tokenizer.from_pretrained(path, chat_template=chat_template)
        self.chat = chat

    async def count(self, text: str) -> int:
        if self.chat:
            rendered = self.tok.apply_chat_template([{"role": "user", "content": text}])
            return len(self.tok.encode(rendered, add_special_tokens=False))
        return len(self.tok.encode(text, add_special_tokens=True))

    async def encode_plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    async def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class ServerCounter:
    """The server's ``POST /tokenize`` and ``/detokenize`` (vLLM and vserve).

    ``post(path, body)`` returns the decoded JSON of a 200 answer and raises otherwise.
    """

    def __init__(self, post: Callable[[str, dict[str, Any]], Awaitable[Any]], model: str,
                 chat: bool) -> None:
        self.post = post
        self.model = model
        self.chat = chat

    async def count(self, text: str) -> int:
        if self.chat:
            body: dict[str, Any] = {"model": self.model,
                                    "messages": [{"role": "user", "content": text}]}
        else:
            body = {"model": self.model, "prompt": text}
        out = await self.post("/tokenize", body)
        return int(out["count"])

    async def encode_plain(self, text: str) -> list[int]:
        out = await self.post("/tokenize", {"model": self.model, "prompt": text,
                                            "add_special_tokens": False})
        return [int(t) for t in out["tokens"]]

    async def decode(self, ids: list[int]) -> str:
        out = await self.post("/detokenize", {"model": self.model, "tokens": ids})
        return str(out["prompt"])


def target_lengths(n: int, mean: int, range_ratio: float, rng: random.Random) -> list[int]:
    """``n`` lengths uniform in ``[mean·(1-r), mean·(1+r)]`` (all ``mean`` when r = 0)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, round(mean * (1 - range_ratio)))
    hi = max(lo, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(0, n)))


async def exact_random_prompts(counter: TokenCounter, input_lens: list[int],
                               output_lens: list[int], rng: random.Random, chat: bool,
                               parallel: int = 16, max_rounds: int = 24) -> list[BenchPrompt]:
    """Random prompts whose count (``counter.count``) equals each asked input length where
    the tokenizer allows it (otherwise the closest found)."""
    overhead = await counter.count("")
    longest = max(input_lens, default=1)
    pool = await counter.encode_plain(random_words(2 * longest + 512, rng))
    while len(pool) < 2 * longest + 64:
        pool += await counter.encode_plain(" " + random_words(2 * longest + 512, rng))
    offsets = [rng.randrange(len(pool)) for _ in input_lens]
    doubled = pool + pool
    gate = asyncio.Semaphore(parallel)

    async def one(target: int, off: int) -> tuple[str, int]:
        k = max(1, target - overhead)
        best: tuple[int, str, int] | None = None  # (distance, text, count)
        seen: set[int] = set()
        for _ in range(max_rounds):
            if k in seen:  # oscillating around a word merge: move the window instead
                # (far: the next window usually ends on the same merge; measured, one prompt
                # in ~1,600 still missed its length after 8 rounds with a one-token move)
                off = (off + 1 + rng.randrange(len(pool))) % len(pool)
                seen.clear()
            seen.add(k)
            text = await counter.decode(doubled[off:off + k])
            n = await counter.count(text)
            if best is None or abs(n - target) < best[0]:
                best = (abs(n - target), text, n)
            if n == target:
                break
            k = max(1, min(len(pool), k + target - n))
        assert best is not None
        return best[1], best[2]

    async def gated(target: int, off: int) -> tuple[str, int]:
        async with gate:
            return await one(target, off)

    made = await asyncio.gather(*(gated(t, o) for t, o in zip(input_lens, offsets)))
    return [BenchPrompt(_as_input(text, chat), n, out)
            for (text, n), out in zip(made, output_lens)]


def word_prompts(input_lens: list[int], output_lens: list[int], rng: random.Random, chat: bool,
                 tokens_per_word: float, overhead: int) -> list[BenchPrompt]:
    """Approximate prompts: ``(len - overhead) / tokens_per_word`` random words each."""
    out = []
    for target, olen in zip(input_lens, output_lens):
        words = max(1, round((target - overhead) / max(tokens_per_word, 1e-6)))
        out.append(BenchPrompt(_as_input(random_words(words, rng), chat), -1, olen))
    return out


def _as_input(text: str, chat: bool) -> str | list[dict[str, Any]]:
    return [{"role": "user", "content": text}] if chat else text


def load_jsonl(path: str | Path, num_prompts: int, default_output_len: int,
               chat: bool) -> list[BenchPrompt]:
    """Prompts from a JSONL file, one object a line.

    Each line has ``prompt`` (a string; for chat it becomes one user message) or ``messages``
    (chat only), and optionally ``output_len`` (or ``max_tokens``) and ``prompt_len``. The
    first ``num_prompts`` lines are used, cycling when the file has fewer.
    """
    rows: list[BenchPrompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected an object")
            olen_value = obj.get("output_len", obj.get("max_tokens"))
            olen = default_output_len if olen_value is None else int(olen_value)
            plen = int(obj.get("prompt_len", -1))
            if "messages" in obj:
                if not chat:
                    raise ValueError(f"{path}:{lineno}: 'messages' needs --endpoint-type chat")
                prompt: str | list[dict[str, Any]] = list(obj["messages"])
            elif "prompt" in obj and isinstance(obj["prompt"], str):
                prompt = _as_input(obj["prompt"], chat)
            else:
                raise ValueError(f"{path}:{lineno}: needs a string 'prompt' or 'messages'")
            rows.append(BenchPrompt(prompt, plen, olen))
            if len(rows) >= num_prompts:
                break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(num_prompts)]
