"""The one listening socket of ``vserve serve``.

The supervisor binds it once and hands its fd to every API server (see ``fd_passing``); the API
servers serve it with ``uvicorn.Server(config).serve(sockets=[sock])``.

Invariants of a socket returned by :func:`bind_listen_socket`:
- TCP sockets are created with ``proto=IPPROTO_TCP``. asyncio sets TCP_NODELAY on accepted
  connections only when the listening socket's ``proto`` is IPPROTO_TCP; with proto 0, Nagle's
  algorithm meets the client's delayed ACK and every kept-alive response waits ~40 ms.
- SO_REUSEADDR is set, so a restart does not wait for TIME_WAIT connections of the last run.
- It is listening and non-blocking. O_NONBLOCK lives on the open file description, which every
  process holding the fd shares, so it is set once here rather than flipped by whichever API
  server happens to call ``setblocking`` first (asyncio requires non-blocking anyway).
- It is not inheritable (Python's default): children get it only through SCM_RIGHTS.
- ``[::]`` is dual-stack (IPV6_V6ONLY off), like most servers' ``--host ::``.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

DEFAULT_BACKLOG = 2048


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _strip_brackets(host: str) -> str:
    # Users write IPv6 hosts the URL way ("[::1]"); getaddrinfo wants them bare.
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def bind_listen_socket(
    host: str, port: int, uds: str | None = None, backlog: int = DEFAULT_BACKLOG,
    listen: bool = True,
) -> socket.socket:
    """Bind and (unless ``listen`` is False) listen on ``host:port`` (TCP, IPv4 or IPv6) or
    on the Unix socket ``uds``.

    A socket bound but not listening refuses connections at once: the supervisor binds early
    (a taken port fails the start) and listens only when the server is ready, so a client
    (or a load balancer's probe) that connects during startup is refused instead of waiting.

    ``host`` is resolved with getaddrinfo and the first address is used; ``""`` means every
    IPv4 address. Port 0 picks a free port (see :func:`describe` for the real one).

    Raises ValueError for an invalid port or backlog, OSError (with the errno of the failure
    and a message naming ``host:port`` or the path) when resolving or binding fails.
    """
    if backlog < 1:
        raise ValueError(f"backlog must be positive, got {backlog}")
    if uds is not None:
        return _bind_unix(uds, backlog, listen)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port} (host {host!r})")
    bare = _strip_brackets(host) or "0.0.0.0"
    where = _format_hostport(bare, port)
    try:
        infos = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve listen address {where}: {exc.strerror}") from exc
    if not infos:  # pragma: no cover - getaddrinfo raises rather than return nothing
        raise OSError(errno.EADDRNOTAVAIL, f"no address for {where}")
    family, socktype, proto, _canon, sockaddr = infos[0]
    # proto=IPPROTO_TCP explicitly: see the module docstring (Nagle).
    sock = socket.socket(family, socktype, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and sockaddr[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind {where}: {exc.strerror}") from exc
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, backlog: int, listen: bool) -> socket.socket:
    """Bind a Unix stream socket at ``path``, replacing a stale socket file left by a crash.

    A live socket (someone accepts on it) or any non-socket file is never removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"cannot bind unix:{path}: exists and is not a socket")
        if _unix_socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"cannot bind unix:{path}: a server is listening")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind unix:{path}: {exc.strerror}") from exc
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _unix_socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False  # ECONNREFUSED: nobody listens; the file is stale
    finally:
        probe.close()
    return True


def describe(sock: socket.socket) -> str:
    """``http://host:port`` (the real port when bound to 0) or ``unix:PATH``, for logs."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return f"unix:{os.fsdecode(name) if isinstance(name, bytes) else name}"
    addr = sock.getsockname()
    return f"http://{_format_hostport(addr[0], addr[1])}"
