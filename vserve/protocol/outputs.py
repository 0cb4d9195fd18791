"""The output link: each API server (or ``LLM``) binds a PULL, every engine connects a PUSH.

Engine → front end, one frame each, decoded as :data:`EngineOutput`:
``EngineCoreOutputs`` (one step's outputs for this front end's requests), ``EngineStats``
(the answer to a ``GetStats``) and ``EngineDead`` (the engine is going away).
"""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or the model's window
    ABORT = 2  # client abort or front-end death
    ERROR = 3  # the engine failed this request

    def __str__(self) -> str:
        return self.name.lower()


class Logprobs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Logprobs for a run of positions.

    Row i: ``token_ids[i][0]`` is the token at that position (sampled or given) and
    ``logprobs[i][0]`` its logprob; the rest of the row is the top-k, best first.
    ``ranks[i]`` is the 1-based rank of the position's token in the full distribution.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class RequestTiming(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Engine-side timestamps (time.time()) of a finished request, for the front end's
    queue / prefill / decode time metrics."""

    received: float  # the engine took the request in
    first_scheduled: float  # first step that computed any of it
    first_token: float  # its first output token was sampled
    finished: float
    num_preemptions: int = 0


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Logprobs | None = None
    # Logprobs of prompt positions 1..P-1 (the first prompt token has none); may arrive in
    # several pieces when the prompt is prefilled in chunks.
    new_prompt_logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    timing: RequestTiming | None = None  # on the finishing output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, tag="step", array_like=True, omit_defaults=True,
                        gc=False):
    """One step's outputs for the requests of one front end (never empty)."""

    engine_index: int
    outputs: list[EngineCoreOutput]


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    # Counters are cumulative since the engine started (Prometheus-counter friendly).
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # prompt tokens found there
    num_preemptions: int = 0
    num_scheduled_tokens: int = 0  # in the step that produced this report
    prompt_tokens_total: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    generation_tokens_total: int = 0  # tokens sampled


class EngineStats(msgspec.Struct, tag="stats", array_like=True, gc=False):
    """The answer to ``GetStats(call_id)``."""

    call_id: int
    stats: SchedulerStats


class EngineDead(msgspec.Struct, tag="dead", array_like=True, gc=False):
    """The engine failed and is going away; every request it owned is lost."""

    engine_index: int
    reason: str


EngineOutput = EngineCoreOutputs | EngineStats | EngineDead
