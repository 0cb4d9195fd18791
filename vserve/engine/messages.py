"""Wire messages between front ends (API servers, the offline client) and engine cores.

All are msgspec Structs sent as msgpack and decoded against their type: no pickle ever
crosses a socket. ``array_like`` keeps frames small; ``gc=False`` keeps the garbage collector
off these short-lived objects.
"""

from __future__ import annotations

import enum

import msgspec

from vserve.sampling_params import SamplingParams


class RequestType(bytes, enum.Enum):
    """First frame of every front end → engine message."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"
    HELLO = b"\x03"  # engine → front end: "I am rank r", sent once on connect


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or the model's window
    ABORT = 2  # client abort or front-end death
    ERROR = 3  # the engine failed this request

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    client_index: int = 0
    priority: int = 0


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


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: bytes = b""  # msgpack of the result, decoded by the caller against its type
    failure: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    engine_index: int = 0
    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    scheduler_stats: SchedulerStats | None = None
    utility_output: UtilityOutput | None = None
    engine_dead: str | None = None  # the engine is going away; the string says why


class UtilityRequest(msgspec.Struct, array_like=True, gc=False):
    call_id: int
    method: str
    args: list[int | float | str | bool | None] = []


class EngineHello(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Engine → supervisor: the engine process is up (before loading the model)."""

    engine_index: int
    pid: int


class EngineReady(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Engine → supervisor: the model is loaded and the KV cache is allocated."""

    engine_index: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    max_concurrency: float


class EngineStartupError(msgspec.Struct, array_like=True, gc=False, tag=True):
    engine_index: int
    error: str  # the exception's type, message and traceback


HandshakeMessage = EngineHello | EngineReady | EngineStartupError


class EngineStartupInfo(msgspec.Struct, array_like=True, gc=False):
    """Supervisor → engine, in answer to HELLO: what to load and where the front ends are.

    ``input_addrs[i]`` / ``output_addrs[i]`` belong to the front end with client_index i.
    """

    config: bytes  # EngineConfig as msgpack
    model_dir: str
    input_addrs: list[str]
    output_addrs: list[str]
    stats_addr: str | None = None


class EngineControl(msgspec.Struct, array_like=True, gc=False):
    """Supervisor → engine over the handshake link after READY.

    kinds: ``client_died`` (abort every request of ``client_index``), ``shutdown``.
    """

    kind: str
    client_index: int = -1


def engine_identity(engine_index: int) -> bytes:
    """The ZMQ routing id of an engine's DEALER sockets (what ROUTERs address it by)."""
    return engine_index.to_bytes(2, "little")
