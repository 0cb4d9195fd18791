"""Incremental detokenization with stop strings, for streaming outputs.

``IncrementalDetokenizer`` turns a growing list of output token ids into text deltas. It uses
the prefix/read offset window (as vLLM does): each step decodes only the tokens since the last
point where text was emitted plus the few before it, never the whole output, so a step costs
O(window) however long the output is.

Invariants (tested in ``tests/test_detokenizer.py``):

(a) the deltas returned by ``update``/``finish`` concatenate to ``output_text``; when no stop
    string matched, after ``finish()`` that equals
    ``tokenizer.decode(output_ids, skip_special_tokens, clean_up_tokenization_spaces=False)``
    for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, the demo). Decoding starts in the
    context of the prompt's last tokens, so SentencePiece-style tokenizers keep the leading
    space of the first output token, which a standalone ``decode(output_ids)`` strips (vLLM
    streams it the same way).
(b) while streaming, text is emitted only when the window's decode does not end in U+FFFD, so
    an incomplete UTF-8 sequence split across tokens is held until its bytes complete;
    ``finish()`` emits whatever decode gives. Everything emitted is final: ``output_text`` is
    always a prefix of the text the whole output decodes to.
(c) while streaming, the longest tail of the text that is a prefix of some stop string is held
    back (at most ``max(len(s) for s in stop) - 1`` characters), so a stop string is never
    partially emitted.
(d) stop strings are matched in the text, not in tokens: one spanning several tokens is found.
    The first stop string to *complete* in the text wins (the earliest end; on a tie the
    longest), which does not depend on how the tokens were batched into updates.

After a stop string matched, ``output_text`` ends right before it (or right after it with
``include_stop_str_in_output``), text after it is dropped, and further ``update``/``finish``
calls return "" and change nothing: the caller aborts the request.
"""

from __future__ import annotations

from collections.abc import Sequence

from vserve.frontend.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first output token (vLLM uses 5 too): enough for
# a SentencePiece leading space or a byte-level merge at the boundary.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams one sequence's output text. Not thread-safe; one per sequence."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        if stop is not None and any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop: tuple[str, ...] = tuple(stop or ())
        self._max_holdback = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self.stop_matched: str | None = None
        self.output_token_ids: list[int] = []

        # Window over ``self._ids`` (context + output): text of ids[prefix:read] is what was
        # already committed, ids[read:] is not committed yet.
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a UTF-8 character: its tail would swallow the output's
            # first bytes; decode the output on its own instead.
            self._ids, self._read_offset, self._prefix_text = [], 0, ""

        self._text = ""  # committed text: final, includes what the stop holdback keeps back
        self._emitted = 0  # chars of self._text returned as deltas so far
        self._finished = False

    @property
    def output_text(self) -> str:
        """Everything emitted so far (the concatenation of all deltas)."""
        return self._text[: self._emitted]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids, self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add output tokens; return the new text delta ("" when all is held back)."""
        if self.stop_matched is not None or self._finished or not new_token_ids:
            return ""
        self.output_token_ids.extend(new_token_ids)
        self._ids.extend(new_token_ids)
        window_text = self._decode(self._ids[self._prefix_offset :])
        pending = window_text[len(self._prefix_text) :]
        if len(window_text) > len(self._prefix_text) and not pending.endswith(_REPLACEMENT_CHAR):
            self._commit(pending)
            stable_pending = ""
        else:
            # An incomplete character ends the window; what precedes it is final already, so a
            # stop string there is found now rather than when the character completes.
            stable_pending = pending.rstrip(_REPLACEMENT_CHAR)
        return self._emit(stable_pending, final=False)

    def finish(self) -> str:
        """Flush: the text held back for an incomplete character or a possible stop string."""
        if self.stop_matched is not None or self._finished:
            return ""
        self._finished = True
        window_text = self._decode(self._ids[self._prefix_offset :])
        self._text += window_text[len(self._prefix_text) :]
        return self._emit("", final=True)

    def _commit(self, pending: str) -> None:
        self._text += pending
        # The next window starts at the tokens just committed: enough context for merges and
        # leading spaces at the boundary, and the decode stays a few tokens long.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if self._prefix_offset > 4 * _PROMPT_CONTEXT_TOKENS:
            # Drop ids before the window so that memory stays O(window), not O(output).
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _emit(self, stable_pending: str, final: bool) -> str:
        """Find a stop string in the unemitted text, then return what may be emitted now."""
        if self._stop:
            candidate = self._text + stable_pending
            match = self._find_stop(candidate, self._emitted)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self._include_stop else start
                self.stop_matched = stop
                self._text = candidate[:end]
                return self._take(end)
        end = len(self._text)
        if not final:
            end -= self._stop_prefix_len(self._text, self._emitted)
        return self._take(end)

    def _take(self, end: int) -> str:
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self, text: str, start: int) -> tuple[int, str] | None:
        """The stop string that completes first in ``text[start:]``: (its index, itself)."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self._stop:
            i = text.find(s, start)
            if i >= 0:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[0] + best[1], best[2])

    def _stop_prefix_len(self, text: str, start: int) -> int:
        """Length of the longest tail of ``text[start:]`` that begins some stop string."""
        for k in range(min(self._max_holdback, len(text) - start), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


def token_display(tokenizer: Tokenizer, token_id: int) -> str:
    """The text shown for one token in logprobs: ``decode([token_id])`` with special tokens.

    A byte-level token holding part of a multi-byte character decodes to U+FFFD (there is no
    text for half a character); an id the tokenizer does not know decodes to "".
    """
    return tokenizer.decode(
        [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
