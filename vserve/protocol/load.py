"""The load links around the coordinator (a thread of the supervisor).

- stats in: every engine PUSHes :class:`EngineLoad` to the coordinator's PULL;
- stats out: the coordinator PUBlishes :class:`LoadSnapshot` to every API server's SUB.
"""

from __future__ import annotations

import msgspec


class EngineLoad(msgspec.Struct, array_like=True, gc=False):
    """Engine → coordinator: this engine's current queue depths and KV-cache use (0..1)."""

    engine_index: int
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    # Cumulative counters, for the supervisor's periodic stats line.
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class LoadSnapshot(msgspec.Struct, array_like=True, gc=False):
    """Coordinator → API servers: every engine's latest load; ``engines[i].engine_index == i``.

    ``seq`` grows by one per snapshot (receivers ignore anything not newer).
    """

    seq: int
    timestamp: float  # time.time() on the coordinator when published
    engines: list[EngineLoad]
