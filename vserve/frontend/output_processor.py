"""Front-end side of outputs: detokenize, apply stop strings, build logprobs.

Shared by the API servers and the offline ``LLM``. The engine sends token ids; each
``RequestState`` turns them into text deltas. A stop string is found here (the engine works
in tokens), so a request that hits one is finished here and the caller must abort it in the
engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from vserve.frontend.detokenizer import IncrementalDetokenizer, token_display
from vserve.frontend.tokenizer import Tokenizer
from vserve.outputs import Logprob, PositionLogprobs
from vserve.protocol.outputs import EngineCoreOutput, FinishReason, Logprobs
from vserve.protocol.sampling import SamplingParams


@dataclass
class CompletionDelta:
    """What one engine output adds to one sequence."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    # True when the sequence finished here on a stop string: the engine must be told.
    needs_abort: bool = False


def to_position_logprobs(
    tokenizer: Tokenizer, lp: Logprobs, detokenize: bool = True
) -> list[PositionLogprobs]:
    rows: list[PositionLogprobs] = []
    for ids, vals, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
        row: PositionLogprobs = {}
        for j, (tok, val) in enumerate(zip(ids, vals)):
            if tok in row:
                continue
            row[tok] = Logprob(
                logprob=val,
                rank=rank if j == 0 else j,
                decoded_token=token_display(tokenizer, tok) if detokenize else None,
            )
        rows.append(row)
    return rows


class RequestState:
    """One sequence (one of a request's n) as the front end tracks it."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, out: EngineCoreOutput) -> CompletionDelta | None:
        """Fold one engine output in; None when there is nothing to report."""
        if self.finished:
            return None  # e.g. the ABORT echo after we stopped on a stop string
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.new_prompt_logprobs is not None and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(to_position_logprobs(self.tokenizer,
                                                             out.new_prompt_logprobs))
        new_ids = list(out.new_token_ids)
        delta_text = self.detok.update(new_ids) if new_ids else ""
        new_lps: list[PositionLogprobs] | None = None
        if self.logprobs is not None and out.new_logprobs is not None:
            new_lps = to_position_logprobs(self.tokenizer, out.new_logprobs)
        needs_abort = False
        finish: str | None = None
        stop_reason: int | str | None = out.stop_reason
        if self.detok.stop_matched is not None:
            finish, stop_reason = "stop", self.detok.stop_matched
            needs_abort = out.finish_reason is None
        elif out.finish_reason is not None:
            finish = str(out.finish_reason) if out.finish_reason != FinishReason.ERROR else "error"
        if finish is not None and self.detok.stop_matched is None:
            delta_text += self.detok.finish()
        self.token_ids.extend(new_ids)
        if new_lps is not None and self.logprobs is not None:
            self.logprobs.extend(new_lps)
            if self.cumulative_logprob is not None and out.new_logprobs is not None:
                self.cumulative_logprob += sum(r[0] for r in out.new_logprobs.logprobs)
        self.text += delta_text
        self.finish_reason, self.stop_reason = finish, stop_reason if finish else None
        if not (new_ids or delta_text or finish or out.new_prompt_logprobs):
            return None
        return CompletionDelta(
            index=self.index,
            token_ids=new_ids,
            text=delta_text,
            logprobs=new_lps,
            finish_reason=finish,
            stop_reason=self.stop_reason,
            error=out.error,
            needs_abort=needs_abort,
        )
