"""Handing the listening socket from the supervisor to API servers with SCM_RIGHTS.

The supervisor keeps the listening socket for its whole life and runs a
:class:`ListenSocketServer` on a Unix-domain socket inside the private run dir. Every API
server (the first ones and any replacement for one that crashed) connects, receives the fd
and serves it. Because the supervisor never closes its copy, the port stays open (the kernel
keeps completing handshakes into the backlog) even while no API server is alive.

Protocol, one hand-off per connection: the server accepts, sends a msgpack
:class:`ListenSocketHeader` in a single ``sendmsg`` carrying the fd as SCM_RIGHTS, and closes.
The client reads to EOF (the header is tiny, but a stream socket may split it).

Invariants:
- The hand-off socket file has mode 0600 and only peers with our uid are served (checked with
  SO_PEERCRED); it lives in the 0700 run dir, so both checks are belt and braces.
- The received fd is close-on-exec (MSG_CMSG_CLOEXEC), so processes started by an API server do
  not hold the port open.
- :class:`ListenSocketServer` never closes the listening socket it hands out: the supervisor
  owns it.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import struct
import threading
import time

import msgspec

from vserve.logging_utils import get_logger

logger = get_logger(__name__)

PROTOCOL_VERSION = 1
_MAX_HEADER = 4096


class ListenSocketHeader(msgspec.Struct, array_like=True, gc=False):
    """Describes the fd that travels with it; the receiver checks the fd against it."""

    version: int
    family: int  # socket.AF_INET, AF_INET6 or AF_UNIX
    address: str  # the bound host, or the path of a Unix socket
    port: int  # 0 for a Unix socket


def _header_for(sock: socket.socket) -> ListenSocketHeader:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = os.fsdecode(name) if isinstance(name, bytes) else str(name)
        return ListenSocketHeader(PROTOCOL_VERSION, int(sock.family), path, 0)
    return ListenSocketHeader(PROTOCOL_VERSION, int(sock.family), str(name[0]), int(name[1]))


def _peer_uid_pid(conn: socket.socket) -> tuple[int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return uid, pid


class ListenSocketServer:
    """Serves ``listen_sock``'s fd to every local client that connects to ``path``.

    Binds at construction (an existing file at ``path`` is replaced) and serves from a daemon
    thread until :meth:`close`. Usable as a context manager.
    """

    def __init__(self, listen_sock: socket.socket, path: str) -> None:
        self.path = path
        self.handoffs = 0  # number of fds handed out, for logs and tests
        self._header = msgspec.msgpack.encode(_header_for(listen_sock))
        self._listen_sock = listen_sock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._server.bind(path)
            # chmod after bind: the 0700 run dir already keeps others out of the window.
            os.chmod(path, 0o600)
            self._server.listen(64)
            self._inode = os.stat(path).st_ino
        except BaseException:
            self._server.close()
            raise
        # A socketpair wakes the thread on close(); closing a socket that another thread is
        # blocked on in accept() does not reliably wake it on Linux.
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="listen-fd-server", daemon=True)
        self._thread.start()

    def __enter__(self) -> ListenSocketServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._server.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        while not self._closed.is_set():
            events = poller.poll()
            if self._closed.is_set() or any(fd == self._wake_r.fileno() for fd, _ in events):
                return
            try:
                conn, _ = self._server.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                logger.warning("hand-off accept failed: %s", exc)
                continue
            with conn:
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)  # a peer that never reads cannot wedge the thread
            uid, pid = _peer_uid_pid(conn)
            if uid != os.getuid():
                logger.warning("refused listen-socket hand-off to pid %d (uid %d)", pid, uid)
                return
            socket.send_fds(conn, [self._header], [self._listen_sock.fileno()])
            self.handoffs += 1
            logger.debug("handed the listening socket to pid %d", pid)
        except OSError as exc:
            logger.warning("listen-socket hand-off failed: %s", exc)

    def close(self) -> None:
        """Stop serving and remove the socket file (if it is still ours). Never raises."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5.0)
        for s in (self._server, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(OSError):
            # Only unlink our own file: a new server may already have replaced it.
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _connect(path: str, deadline: float) -> socket.socket:
    # Retry while the supervisor's server is not there yet: it normally starts first, but a
    # client must not depend on that ordering.
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no listen-socket server at {path}: {exc}") from exc
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


def _recv_fds(conn: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int], int]:
    """Like ``socket.recv_fds`` with MSG_CMSG_CLOEXEC, which CPython's helper drops (it
    accepts a ``flags`` argument and ignores it), leaving the port inheritable by children."""
    int_size = array.array("i").itemsize
    data, ancdata, flags, _ = conn.recvmsg(
        bufsize, socket.CMSG_LEN(maxfds * int_size), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % int_size])
    return data, list(fds), flags


def receive_listen_socket(path: str, timeout: float = 10.0) -> socket.socket:
    """Receive the supervisor's listening socket from the hand-off server at ``path``.

    Returns a non-blocking socket that shares the supervisor's listening socket (same
    inode). Raises TimeoutError if no server answers within ``timeout`` seconds, OSError if
    the reply carries no fd or a malformed header.
    """
    deadline = time.monotonic() + timeout
    conn = _connect(path, deadline)
    fds: list[int] = []
    try:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, fds, flags = _recv_fds(conn, _MAX_HEADER, 4)
            chunks = [data]
            while data:  # read to EOF: the server closes after one hand-off
                data = conn.recv(_MAX_HEADER)
                chunks.append(data)
        except TimeoutError as exc:
            raise TimeoutError(f"listen-socket hand-off from {path} timed out") from exc
        if flags & socket.MSG_CTRUNC or len(fds) != 1:
            raise OSError(f"listen-socket hand-off from {path} carried {len(fds)} fds")
        try:
            header = msgspec.msgpack.decode(b"".join(chunks), type=ListenSocketHeader)
        except msgspec.DecodeError as exc:
            raise OSError(f"malformed listen-socket header from {path}: {exc}") from exc
        if header.version != PROTOCOL_VERSION:
            raise OSError(f"listen-socket protocol {header.version} != {PROTOCOL_VERSION}")
        sock = socket.socket(fileno=fds.pop())
        if sock.family != header.family or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OSError(f"received fd is {sock.family!r}/{sock.type!r}, not as announced")
        # The open file description is already non-blocking (see listen.py); make the Python
        # object agree so that its methods do not mistake EAGAIN for an error.
        sock.setblocking(False)
        return sock
    finally:
        conn.close()
        for fd in fds:  # anything not turned into the returned socket
            with contextlib.suppress(OSError):
                os.close(fd)
