"""The engine's view of one request (one sequence: n > 1 arrives as n requests)."""

from __future__ import annotations

import enum
import time
from typing import Any

from vserve.protocol.outputs import FinishReason
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue; its blocks were freed, it recomputes
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}
#: Statuses at or above this one are finished (a plain int compare on the hot path).
FINISHED = int(RequestStatus.FINISHED_STOPPED)


class Request:
    """Mutable engine-side state of a request.

    Invariants: ``num_computed_tokens <= num_tokens``; the KV of tokens
    ``[0, num_computed_tokens)`` lives in the blocks the KV cache manager holds for this
    request; a request is decoding once ``num_computed_tokens == num_tokens - 1`` or more.
    """

    # Slots: the scheduler and sampler read these attributes for every row of every step
    # (an instance dict of this many keys is slower to read).
    __slots__ = ("all_token_ids", "arrival_time", "block_hashes", "block_ids",
                 "client_index", "eos_ids_active", "eos_token_ids", "filters",
                 "first_scheduled_time", "first_token_time", "grammar", "history_free",
                 "max_tokens", "min_tokens", "num_cached_tokens", "num_computed_tokens",
                 "num_draws", "num_preemptions", "num_prompt_logprobs_done",
                 "num_prompt_tokens", "output_token_ids", "penalized", "plain_greedy",
                 "priority", "prompt_token_ids", "received_time", "request_id",
                 "sampling_params", "seed", "status", "stop_reason", "stop_token_ids",
                 "temperature", "wants_logprobs")

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int],
        arrival_time: float | None = None,
        client_index: int = 0,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.client_index = client_index
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        # Structured outputs: the llguidance matcher that has consumed every output token so
        # far (``vserve.structured.matcher``); None for an unconstrained request.
        self.grammar: Any = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first schedule; -1 before
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Chained block hashes of this request's full blocks (filled by the KV cache manager).
        self.block_hashes: list[int] = []
        # The last prompt position whose logprob was sent (inclusive; 0 = none yet).
        self.num_prompt_logprobs_done = 0
        self.max_tokens = sampling_params.max_tokens
        self.num_prompt_tokens = len(self.prompt_token_ids)
        # What the stop checks read every step, taken out of the parameters once.
        self.min_tokens = sampling_params.min_tokens
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.eos_ids_active = frozenset() if sampling_params.ignore_eos else self.eos_token_ids
        self.wants_logprobs = sampling_params.logprobs is not None
        # What the sampler reads every step, likewise (``vserve.worker.sampler``).
        p = sampling_params
        self.temperature = 0.0 if p.greedy else p.temperature  # 0.0: greedy
        self.seed = None if p.greedy else p.seed  # the seed of a sampled row's noise
        self.num_draws = 0  # tokens drawn so far (a chained step draws before it is applied)
        #: bit 1: top-k, 2: top-p, 4: min-p (top-k at or above the vocabulary filters nothing)
        self.filters = (p.top_k > 0) | (p.top_p < 1.0) << 1 | (p.min_p > 0.0) << 2
        #: a logit bias or penalty changes the row's logits (``min_tokens`` counts apart)
        self.penalized = bool(p.logit_bias or p.repetition_penalty != 1.0
                              or p.presence_penalty or p.frequency_penalty)
        #: nothing of the row's sampling reads its output so far, and it has no grammar —
        #: unless ``grammar`` is set (tests set it without ``structured``)
        self.history_free = not self.penalized and p.min_tokens == 0 and p.structured is None
        #: its token is the argmax of its raw logits (greedy, nothing above, no logprobs)
        self.plain_greedy = self.history_free and p.greedy and p.logprobs is None
        # The live list of block ids the KV cache manager holds for this request (empty when
        # it holds none); the manager appends to it in place.
        self.block_ids: list[int] = []
        # Engine-clock timestamps for the request's metrics (0.0 = not yet).
        self.received_time = time.time()
        self.first_scheduled_time = 0.0
        self.first_token_time = 0.0

    @classmethod
    def from_engine_core_request(cls, req: EngineCoreRequest) -> Request:
        return cls(
            req.request_id,
            req.prompt_token_ids,
            req.sampling_params,
            req.eos_token_ids,
            req.arrival_time,
            req.client_index,
            req.priority,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
