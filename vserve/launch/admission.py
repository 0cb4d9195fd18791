"""The server-wide admission ledger: how many sequences each API server has in flight,
shared through a small file in the run dir so that ``--max-num-queued-reqs`` is exact.

A bound checked against the coordinator's load snapshots lags by up to a snapshot: in a
burst every API server sees the same stale queue and admits on it (14 admitted for a
bound of 8 with 4 servers). Here admission is a check-and-add under an exclusive
``flock`` on the ledger file, so two servers can never both take the last place.

Layout: one int64 per API server index — sequences that server admitted and that have not
finished. Invariants: a server changes only its own slot, and only under the lock; the
supervisor zeroes a dead server's slot before starting its replacement (the engines abort
that server's requests when told it died), and a server zeroes its own slot when it
starts. ``flock`` is released by the kernel when a holder dies, so a crash mid-admission
cannot wedge the others. All API servers run on the head machine, so a file lock is
enough even in multi-node mode.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

_SLOT = struct.Struct("<q")


class AdmissionLedger:
    def __init__(self, path: str | os.PathLike[str], num_servers: int,
                 create: bool = False) -> None:
        self.path = Path(path)
        self.num_servers = num_servers
        if create:
            with open(self.path, "wb") as f:
                f.write(bytes(_SLOT.size * num_servers))
            os.chmod(self.path, 0o600)
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SLOT.size * num_servers)

    def _total_locked(self) -> int:
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[0]
                   for i in range(self.num_servers))

    def _add_locked(self, index: int, delta: int) -> None:
        offset = index * _SLOT.size
        (count,) = _SLOT.unpack_from(self._map, offset)
        _SLOT.pack_into(self._map, offset, max(0, count + delta))

    def try_admit(self, index: int, count: int, limit: int) -> int | None:
        """Count ``count`` more sequences for server ``index`` if the whole server then
        holds at most ``limit``, or if it holds none (a single request larger than the
        limit runs alone rather than never); None if admitted, else the number in flight
        that refused it."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            total = self._total_locked()
            if total and total + count > limit:
                return total
            self._add_locked(index, count)
            return None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self, index: int, count: int) -> None:
        """Server ``index``'s ``count`` admitted sequences finished."""
        if count <= 0:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._add_locked(index, -count)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def reset(self, index: int) -> None:
        """Server ``index`` holds nothing: it just started, or it died and its requests
        were aborted."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _SLOT.pack_into(self._map, index * _SLOT.size, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def counts(self) -> list[int]:
        """Sequences in flight per server; for tests and metrics."""
        return [_SLOT.unpack_from(self._map, i * _SLOT.size)[0]
                for i in range(self.num_servers)]

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
