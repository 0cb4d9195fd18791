"""What the scheduler hands the model runner each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vserve.core.request import Request
from vserve.protocol.outputs import Logprobs


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The runner computes positions ``start .. start + num_new_tokens - 1`` with
    ``start = request.num_computed_tokens + num_ahead`` (``num_computed_tokens`` is not
    advanced yet: the scheduler advances it in ``update_from_output``). ``block_ids`` cover
    every one of them and stay pinned until the request finishes or is preempted. ``sample``:
    the row's last position is the sequence's last, so the runner samples the next token.

    ``num_ahead`` is non-zero only in a *chained* step (async scheduling,
    ``Scheduler.schedule_chained``), built and launched while the previous step is still in
    flight: it is how many of the request's tokens that step computes. The token id of a
    position the runner is asked for is ``request.all_token_ids[p]`` when
    ``p < len(request.all_token_ids)`` at launch; the only other case is
    ``p == len(request.all_token_ids)``, the token the step in flight is sampling, which comes
    from that step's output. By the time the scheduler applies a chained step's output, the
    previous step's is applied and ``num_computed_tokens`` has caught up, so ``samples`` and
    ``update_from_output`` need no special case.
    """

    request: Request
    num_new_tokens: int
    block_ids: list[int]
    num_ahead: int = 0
    sample: bool = False

    @property
    def samples(self) -> bool:
        """``sample``, re-derived once every step before this one is applied."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    # Requests preempted while building this step (their blocks are already freed).
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous step; runners drop any
    # per-request state (the sampler's draw counts, persistent rows, …) they keep for these.
    finished_request_ids: set[str] = field(default_factory=set)
    # Built by ``Scheduler.schedule_chained``: every row is a decode whose input token is the
    # previous step's sampled token, still on the device when this step is launched.
    chained: bool = False

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    # request_id → sampled token, for every scheduled request whose ``samples`` is true.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # request_id → one-row Logprobs for the sampled token (only when the request asked).
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # request_id → logprobs for the prompt positions computed in this step (may be empty
    # rows' worth when the chunk held only the first prompt token).
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)
