"""Routing by load: an API server's view of every engine's queue, from the coordinator's
snapshots plus its own routing since the last one."""

from __future__ import annotations

import threading
from collections.abc import Collection

from vserve.protocol.load import LoadSnapshot


class LoadTracker:
    """An API server's view of engine load, for routing. Thread-safe; no asyncio needed.

    Holds the latest snapshot plus local bumps: each request routed since that snapshot adds
    one to its engine's waiting count, so that a burst arriving between two snapshots spreads
    over the engines instead of piling onto the one that looked idlest. A newer snapshot
    replaces the local copy (and so drops the bumps).
    """

    def __init__(self, num_engines: int) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be positive, got {num_engines}")
        self.num_engines = num_engines
        self._lock = threading.Lock()
        self._waiting = [0] * num_engines
        self._running = [0] * num_engines
        self._seq = -1
        self._next = 0  # round-robin cursor among equally loaded engines

    @property
    def seq(self) -> int:
        return self._seq

    def update(self, snapshot: LoadSnapshot) -> bool:
        """Adopt ``snapshot`` unless its seq is not newer; True if adopted.

        Engines outside ``0..num_engines-1`` are ignored.
        """
        with self._lock:
            if snapshot.seq <= self._seq:
                return False
            self._seq = snapshot.seq
            for load in snapshot.engines:
                if 0 <= load.engine_index < self.num_engines:
                    self._waiting[load.engine_index] = load.num_waiting
                    self._running[load.engine_index] = load.num_running
            return True

    def _pick_locked(self, allowed: Collection[int] | None) -> int:
        n = self.num_engines
        scores = [4 * w + r if allowed is None or i in allowed else None
                  for i, (w, r) in enumerate(zip(self._waiting, self._running, strict=True))]
        best = min(s for s in scores if s is not None)
        # Round-robin among ties: deterministic, yet equal engines take turns.
        for k in range(n):
            i = (self._next + k) % n
            if scores[i] == best:
                self._next = (i + 1) % n
                return i
        raise AssertionError("unreachable")  # pragma: no cover

    def unbump(self, engine_index: int) -> None:
        """A routed request left the waiting state (its first output arrived, or it ended):
        stop counting it. Without this a burst of short requests would keep counting as
        waiting until the next snapshot — up to a heartbeat on an idle engine — and a
        server-wide queue bound would refuse requests with nothing waiting."""
        with self._lock:
            if self._waiting[engine_index] > 0:
                self._waiting[engine_index] -= 1

    def pick_and_bump(self, allowed: Collection[int] | None = None) -> int:
        """The engine with the lowest ``4 * waiting + running`` (ties go round-robin) among
        ``allowed`` (default: all; must not be empty), counted as one more waiting there
        until the next snapshot or :meth:`unbump`."""
        with self._lock:
            index = self._pick_locked(allowed)
            self._waiting[index] += 1
            return index

    def loads(self) -> list[tuple[int, int]]:
        """(waiting, running) per engine, bumps included; for metrics and tests."""
        with self._lock:
            return list(zip(self._waiting, self._running, strict=True))
