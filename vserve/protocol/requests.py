"""The request link: each API server (or ``LLM``) binds a ROUTER, every engine connects a
DEALER whose routing id is its rank (:func:`engine_identity`).

Front end → engine, one frame each, decoded as :data:`EngineInput`: ``AddRequests`` (the
requests a front end routed to this engine within one turn of its event loop),
``AbortRequests``, ``GetStats``.

Engine → front end, one frame: :class:`EngineAnnounce`, sent when the DEALER connects and
again when the front end at that endpoint was replaced (a ROUTER can address a peer only
after hearing from it).
"""

from __future__ import annotations

import msgspec

from vserve.protocol.sampling import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sequence to generate (``n > 1`` arrives as n of these, seeds ``seed + i``).

    Its outputs go to the front end ``client_index`` only.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    client_index: int = 0
    priority: int = 0


class AddRequests(msgspec.Struct, tag="add", array_like=True, gc=False):
    """Requests to add, in order."""

    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    """Stop these requests and free their KV blocks before the next step. Unknown or already
    finished ids are ignored; each aborted one answers with ``FinishReason.ABORT``."""

    request_ids: list[str]


class GetStats(msgspec.Struct, tag="stats", array_like=True, gc=False):
    """Ask for the engine's ``SchedulerStats``; answered by an ``EngineStats`` with the same
    ``call_id`` on ``client_index``'s output link."""

    call_id: int
    client_index: int


EngineInput = AddRequests | AbortRequests | GetStats


class EngineAnnounce(msgspec.Struct, tag="announce", array_like=True, gc=False):
    """Engine → front end on the request link: "rank ``engine_index`` is connected"."""

    engine_index: int
    pid: int = 0  # which process: tells a replacement from the engine it replaced


def engine_identity(engine_index: int) -> bytes:
    """The ZMQ routing id of an engine's DEALER sockets (what ROUTERs address it by)."""
    return engine_index.to_bytes(2, "little")
