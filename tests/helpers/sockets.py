"""Which process holds which socket, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os


def socket_inodes(pid: int) -> set[int]:
    """Inodes of every socket process ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def listening_inodes(port: int) -> list[int]:
    """Inodes of every TCP socket in LISTEN state (0A) on ``port``, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port:
                    found.append(int(cols[9]))
    return found
