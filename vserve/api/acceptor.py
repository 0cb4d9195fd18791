"""Accepting from the shared listening socket so that connections spread over the servers.

Every API server holds the same listening socket. ``BalancedAcceptor`` replaces the event
loop's own accept loop (which takes up to a whole backlog per wakeup) with one that takes a
single connection per readiness callback, and only while this server holds no more than the
least-loaded live server plus one (``vserve.launch.connections.ConnectionTable``). When all
servers wake for a burst they take turns; a server ahead of the others stops accepting and
looks again every ``PAUSE_S``. The least-loaded server never pauses, so a connection always
has a taker; a server that dies or stops answering drops out of the comparison (its slot is
marked absent, or its heartbeat goes stale), and its replacement, holding none, takes new
connections until it has caught up.

Accepted sockets go to uvicorn's protocol through ``loop.connect_accepted_socket``, awaited
one after another by one long-lived task (a task per connection would double the cost of
the accept path): the HTTP handling is uvicorn's, with the limits of
``vserve.api.http_guard``.

A server holds at most ``max_open`` connections (below its file-descriptor limit, so that
a flood of connections cannot starve it of descriptors for its own sockets and files). At
the cap it closes its oldest *idle* connection (no request in progress: kept alive between
requests, or never sent a byte) to take the next one; with none idle, new connections wait
in the listen backlog, or for another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from vserve.api.http_guard import ConnectionHooks
from vserve.launch.connections import ConnectionTable
from vserve.logging_utils import get_logger

logger = get_logger(__name__)

PAUSE_S = 0.002
HEARTBEAT_S = 0.2
SLACK = 1  # connections a server may hold beyond the least-loaded live one


class BalancedAcceptor(ConnectionHooks):
    def __init__(self, sock: socket.socket, table: ConnectionTable, index: int,
                 max_open: int) -> None:
        self.sock = sock
        self.table = table
        self.index = index
        self.max_open = max_open
        self.open = 0
        # Connections with no request in progress, oldest first (dict: ordered, O(1) moves).
        self._idle: dict[Any, None] = {}
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = None
        self._accepted: deque[socket.socket] = deque()
        self._wakeup = asyncio.Event()
        self._handing: asyncio.Task[None] | None = None
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        # Plain ints: socket.accept() converts them to enums for every connection.
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        sock.setblocking(False)

    def start(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        """Start accepting (call from inside the running event loop)."""
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self.table.write(self.index, self.open)
        self._handing = self._loop.create_task(self._hand_over(), name="hand-over")
        self._read()
        self._beat()

    def stop(self) -> None:
        """Stop accepting; connections already accepted are left to the server."""
        self._stopped = True
        self._unread()
        if self._timer is not None:
            self._timer.cancel()
        if self._handing is not None:
            self._handing.cancel()
        while self._accepted:
            self._accepted.popleft().close()

    # ---- ConnectionHooks (the protocol's) ---------------------------------------------------
    def closed(self, protocol: Any) -> None:
        self._idle.pop(protocol, None)
        self.connection_closed()

    def idle(self, protocol: Any, idle: bool) -> None:
        if idle:
            self._idle[protocol] = None
        else:
            self._idle.pop(protocol, None)

    def connection_closed(self) -> None:
        self.open -= 1
        self.table.write(self.index, self.open)
        if not self._reading and not self._stopped:
            self._read()  # below the others again, maybe

    # ---- accepting -----------------------------------------------------------------------
    def _read(self) -> None:
        assert self._loop is not None
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _unread(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _may_accept(self) -> bool:
        least = self.table.least_other(self.index)
        return least is None or self.open <= least + SLACK

    def _on_readable(self) -> None:
        if self._stopped:
            return
        if self.open >= self.max_open:
            self._unread()  # at the cap: nothing new until a connection closes
            if self._evict_idle():  # its connection_lost comes on the next loop turn
                assert self._loop is not None
                self._loop.call_later(PAUSE_S, self._resume)
            return
        if not self._may_accept():
            self._unread()  # let the others take the next ones; look again shortly
            assert self._loop is not None
            self._loop.call_later(PAUSE_S, self._resume)
            return
        try:
            fd, _ = self.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return  # another server took it
        except OSError as e:  # EMFILE and friends: keep serving what we have
            logger.warning("accept failed: %s", e)
            return
        conn = socket.socket(*self._kind, fileno=fd)
        conn.setblocking(False)
        if self._tcp:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.open += 1
        self.table.write(self.index, self.open)
        self._accepted.append(conn)
        self._wakeup.set()

    def _evict_idle(self) -> bool:
        while self._idle:
            protocol = next(iter(self._idle))
            del self._idle[protocol]
            if protocol.close_if_idle():
                return True
        return False

    async def _hand_over(self) -> None:
        """Give each accepted socket to the protocol, in order."""
        assert self._loop is not None and self._factory is not None
        loop, factory, accepted = self._loop, self._factory, self._accepted
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while accepted:
                conn = accepted.popleft()
                try:
                    await loop.connect_accepted_socket(factory, conn)
                except OSError as e:  # the peer went away already
                    logger.debug("accepted connection lost at once: %s", e)
                    conn.close()
                    self.connection_closed()

    def _resume(self) -> None:
        if not self._stopped:
            self._read()

    def _beat(self) -> None:
        if self._stopped:
            return
        self.table.write(self.index, self.open)
        assert self._loop is not None
        self._timer = self._loop.call_later(HEARTBEAT_S, self._beat)
