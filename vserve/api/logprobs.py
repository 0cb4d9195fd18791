"""Log-probabilities in the three JSON formats the API speaks.

Input rows are ``PositionLogprobs`` (token id → Logprob) from the output processor: the
position's own token first (with its true rank), then the top-k by rank 1..k (the own token
appears once, at its rank). JSON has no -inf or NaN, so every logprob goes through ``clamp``
(-9999.0, as vLLM does).
"""

from __future__ import annotations

from typing import Any

from vserve.outputs import Logprob, PositionLogprobs

LOGPROB_FLOOR = -9999.0


def clamp(value: float) -> float:
    # ``not >=`` also catches NaN, which compares false with everything.
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _own(row: PositionLogprobs, token_id: int) -> Logprob:
    own = row.get(token_id)
    return own if own is not None else next(iter(row.values()))


def _top(row: PositionLogprobs, k: int) -> list[Logprob]:
    """The row's k most likely tokens, best first."""
    top = [lp for lp in row.values() if lp.rank is not None and lp.rank <= k]
    top.sort(key=lambda lp: lp.rank or 0)
    return top


def completion_logprobs(token_ids: list[int], rows: list[PositionLogprobs | None],
                        k: int, offset: int, first_token_text: str = "") -> dict[str, Any]:
    """The completions format for consecutive positions; ``offset`` is the text offset of the
    first one. A ``None`` row (the prompt's first token) has no logprob; its text is
    ``first_token_text``. ``top_logprobs`` holds the top k plus the position's own token."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, row in zip(token_ids, rows):
        if row is None:
            text = first_token_text
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            own = _own(row, tid)
            text = own.decoded_token or ""
            token_logprobs.append(clamp(own.logprob))
            top = {text: clamp(own.logprob)}
            for lp in _top(row, k):
                top.setdefault(lp.decoded_token or "", clamp(lp.logprob))
            top_logprobs.append(top)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _chat_entry(lp: Logprob) -> dict[str, Any]:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": clamp(lp.logprob),
            "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: list[int], rows: list[PositionLogprobs], k: int
                  ) -> list[dict[str, Any]]:
    """The chat format's ``logprobs.content`` entries: each token with exactly its top k.

    ``bytes`` are the UTF-8 bytes of the token's text; a byte-level token holding part of a
    character shows as U+FFFD (as in vLLM)."""
    content = []
    for tid, row in zip(token_ids, rows):
        entry = _chat_entry(_own(row, tid))
        entry["top_logprobs"] = [_chat_entry(lp) for lp in _top(row, k)]
        content.append(entry)
    return content


def prompt_logprobs_json(rows: list[PositionLogprobs | None]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt position, token id (string key) → details."""
    return [
        None if row is None else {
            str(tid): {"logprob": clamp(lp.logprob), "rank": lp.rank,
                       "decoded_token": lp.decoded_token}
            for tid, lp in row.items()
        }
        for row in rows
    ]


def filter_rows(rows: list[PositionLogprobs | None], k: int) -> list[PositionLogprobs | None]:
    """Rows cut down to their own token and top k (prompt rows may carry more: the engine
    computes one k for both the echo and ``prompt_logprobs``)."""
    out: list[PositionLogprobs | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        first = next(iter(row.items()))
        kept = {first[0]: first[1]}
        for tid, lp in row.items():
            if lp.rank is not None and lp.rank <= k:
                kept.setdefault(tid, lp)
        out.append(kept)
    return out
