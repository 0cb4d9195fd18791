"""The output link: each API server (or ``LLM``) binds a PULL, every engine connects a PUSH.

Engine → front end, one frame each, decoded as :data:`EngineOutput`:
``EngineCoreOutputs`` (one step's outputs for this front end's requests, packed: a few lists
per step, not an object per request), ``EngineStats`` (the answer to a ``GetStats``) and
``EngineDead`` (the engine is going away).
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
    """What one step produced for one request: the per-request view of a step that
    :meth:`EngineCoreOutputs.unpack` gives the front end (on the wire, a step's outputs are
    packed; see there)."""

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


class RequestLogprobs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Logprobs a request asked for, of this step's token and/or of prompt positions."""

    request_id: str
    new_logprobs: Logprobs | None = None
    new_prompt_logprobs: Logprobs | None = None


class FinishedRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request that ended in this step (after its token of the step, if it got one)."""

    request_id: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens that were prefix-cache hits
    error: str | None = None
    timing: RequestTiming | None = None


class EngineCoreOutputs(msgspec.Struct, tag="step", array_like=True, omit_defaults=True,
                        gc=False):
    """One step's outputs for the requests of one front end, packed.

    ``request_ids[i]`` got the new token ``token_ids[i]`` (one token per request per step).
    ``logprobs`` and ``finished`` list only the requests concerned, so a plain decode step
    costs two lists however large the batch; a request may appear in them without a token
    (a prompt chunk's logprobs, an abort, an error).
    """

    engine_index: int
    request_ids: list[str] = []
    token_ids: list[int] = []
    logprobs: list[RequestLogprobs] = []
    finished: list[FinishedRequest] = []

    def unpack(self) -> list[EngineCoreOutput]:
        """The step as one output per request, in order: tokens first, then requests that
        only have logprobs or a finish."""
        outs = [EngineCoreOutput(rid, [tok])
                for rid, tok in zip(self.request_ids, self.token_ids, strict=True)]
        if not self.logprobs and not self.finished:
            return outs
        by_id = {o.request_id: o for o in outs}
        for lp in self.logprobs:
            out = by_id.get(lp.request_id)
            if out is None:
                out = by_id[lp.request_id] = EngineCoreOutput(lp.request_id, [])
                outs.append(out)
            out.new_logprobs = lp.new_logprobs
            out.new_prompt_logprobs = lp.new_prompt_logprobs
        for fin in self.finished:
            out = by_id.get(fin.request_id)
            if out is None:
                out = by_id[fin.request_id] = EngineCoreOutput(fin.request_id, [])
                outs.append(out)
            out.finish_reason = fin.finish_reason
            out.stop_reason = fin.stop_reason
            out.num_cached_tokens = fin.num_cached_tokens
            out.error = fin.error
            out.timing = fin.timing
        return outs


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
