"""The periodic stats line, logged by the supervisor for the whole server.

It reads the coordinator's latest load report from every engine (cumulative counters plus
queue depths), so one line covers all engines and all API servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from vserve.logging_utils import get_logger
from vserve.protocol.load import EngineLoad

logger = get_logger(__name__)


def format_stats(loads: Sequence[EngineLoad], prev: Sequence[EngineLoad] | None,
                 elapsed: float) -> str:
    def total(seq: Sequence[EngineLoad] | None, field: str) -> int:
        return sum(getattr(x, field) for x in seq) if seq else 0

    d_prompt = total(loads, "prompt_tokens_total") - total(prev, "prompt_tokens_total")
    d_gen = total(loads, "generation_tokens_total") - total(prev, "generation_tokens_total")
    d_q = total(loads, "prefix_cache_queries") - total(prev, "prefix_cache_queries")
    d_h = total(loads, "prefix_cache_hits") - total(prev, "prefix_cache_hits")
    kv = sum(x.kv_cache_usage for x in loads) / max(1, len(loads))
    hit = 100.0 * d_h / d_q if d_q else 0.0
    return (f"Engines: {len(loads)}, "
            f"Avg prompt throughput: {d_prompt / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {d_gen / elapsed:.1f} tokens/s, "
            f"Running: {total(loads, 'num_running')} reqs, "
            f"Waiting: {total(loads, 'num_waiting')} reqs, "
            f"KV cache usage: {100.0 * kv:.1f}%, "
            f"Prefix cache hit rate: {hit:.1f}%")


class StatsLogger:
    def __init__(self, get_loads: Callable[[], list[EngineLoad]], interval: float) -> None:
        self.get_loads = get_loads
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-logger", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        prev = list(self.get_loads())
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            loads = list(self.get_loads())
            logger.info("%s", format_stats(loads, prev, max(now - last, 1e-9)))
            prev, last = loads, now
