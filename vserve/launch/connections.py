"""How many connections each API server holds, shared through a small file in the run dir.

The API servers accept from one listening socket. Left alone, whichever process wakes first
takes a whole burst (an event loop accepts up to its backlog per wakeup) and kept-alive
connections stay where they landed: behind a pooling load balancer N servers would serve
like one. So each server accepts one connection at a time and only while it holds no more
than the least-loaded live server plus one (``vserve.api.acceptor``); this table is how they
know.

Layout: one 16-byte slot per API server index — open connections (int64) and a heartbeat
(float64, ``time.monotonic()``, which every process on the machine shares). Invariants:
each server writes only its own slot; the supervisor marks a dead server's slot absent
(-1) before starting its replacement; a slot whose heartbeat is older than
``STALE_AFTER_S`` (a hung or stopped server) is ignored, so no server ever waits on one that
does not accept.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

_SLOT = struct.Struct("<qd")
ABSENT = -1
STALE_AFTER_S = 1.0


class ConnectionTable:
    def __init__(self, path: str | os.PathLike[str], num_servers: int,
                 create: bool = False) -> None:
        self.path = Path(path)
        self.num_servers = num_servers
        size = _SLOT.size * num_servers
        if create:
            with open(self.path, "wb") as f:
                f.write(b"".join(_SLOT.pack(ABSENT, 0.0) for _ in range(num_servers)))
            os.chmod(self.path, 0o600)
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)

    def write(self, index: int, connections: int) -> None:
        """Server ``index`` holds ``connections`` (and is alive now)."""
        _SLOT.pack_into(self._map, index * _SLOT.size, connections, time.monotonic())

    def mark_absent(self, index: int) -> None:
        """For the supervisor: server ``index`` is gone (until its replacement writes)."""
        _SLOT.pack_into(self._map, index * _SLOT.size, ABSENT, 0.0)

    def least_other(self, index: int) -> int | None:
        """The fewest connections a live server other than ``index`` holds (None: none)."""
        now = time.monotonic()
        least: int | None = None
        for i in range(self.num_servers):
            if i != index:
                count, beat = _SLOT.unpack_from(self._map, i * _SLOT.size)
                if count >= 0 and now - beat <= STALE_AFTER_S and (least is None
                                                                    or count < least):
                    least = count
        return least

    def heartbeat_age(self, index: int) -> float | None:
        """Seconds since server ``index`` last wrote its slot (from its event loop); None
        while it is absent (starting, or gone)."""
        count, beat = _SLOT.unpack_from(self._map, index * _SLOT.size)
        return None if count < 0 else time.monotonic() - beat

    def live_counts(self) -> list[int | None]:
        """Connections per server; None for an absent or silent one."""
        now = time.monotonic()
        out: list[int | None] = []
        for i in range(self.num_servers):
            count, beat = _SLOT.unpack_from(self._map, i * _SLOT.size)
            out.append(count if count >= 0 and now - beat <= STALE_AFTER_S else None)
        return out

    def close(self) -> None:
        self._map.close()
