"""CURVE authentication and encryption for the ZMQ links between nodes.

In multi-node mode the head listens on TCP (the handshake, the coordinator, each API
server's request and output sockets); without authentication anyone who can reach those
ports can join as an engine, read users' prompts, or take the service down. Every process
of a multi-node server therefore holds one *cluster key*: a secret text (a file the head
creates, copied to headless nodes or mounted from a Kubernetes Secret), from which every
process derives the same CURVE key pair. Listening sockets are CURVE servers; connecting
sockets are CURVE clients presenting that key pair; and a ZAP handler in each listening
process admits only a client whose public key is the cluster's — which it can present
only by holding the secret. A peer without it fails the handshake: no message of its
reaches vserve.

The public key is never published, so a CURVE client must know the secret to complete even
the first step of the handshake. Links on one machine (IPC in the 0700 run dir) are not
encrypted. This module imports only pyzmq (a leaf, so every role can use it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
from zmq.utils import z85

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MIN_SECRET_CHARS = 32
_DERIVATION_PREFIX = b"vserve cluster key v1\0"


class ClusterKeyError(ValueError):
    pass


@dataclass(frozen=True)
class ClusterKey:
    """The cluster's CURVE key pair (Z85 text, as libzmq's options take it)."""

    public: bytes
    secret: bytes

    @classmethod
    def from_secret_text(cls, text: str) -> ClusterKey:
        secret_text = text.strip()
        if len(secret_text) < _MIN_SECRET_CHARS:
            raise ClusterKeyError(f"a cluster key must be at least {_MIN_SECRET_CHARS} "
                                  f"characters (got {len(secret_text)})")
        seed = hashlib.sha256(_DERIVATION_PREFIX + secret_text.encode()).digest()
        secret = z85.encode(seed)
        return cls(zmq.curve_public(secret), secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterKey:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ClusterKeyError(f"cannot read the cluster key file {path}: "
                                  f"{e.strerror}") from None
        try:
            return cls.from_secret_text(text)
        except ClusterKeyError as e:
            raise ClusterKeyError(f"{path}: {e}") from None


def load_or_create(path: str | os.PathLike[str]) -> tuple[ClusterKey, bool]:
    """The head's key: read from ``path``, or generated there (mode 0600) if the file does
    not exist; (key, created)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return ClusterKey.load(path), False
    except OSError as e:
        raise ClusterKeyError(f"cannot create the cluster key file {path}: "
                              f"{e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    return ClusterKey.load(path), True


def secure_context(ctx: zmq.Context[Any], key: ClusterKey, authenticate: bool) -> None:
    """Make every socket ``ctx`` creates from now on a CURVE client holding ``key``;
    :func:`bind` turns a listening one into a server. ``authenticate``: this process
    listens, so start the ZAP handler that admits only holders of ``key`` (without a
    handler libzmq would admit any CURVE client that knows the server's public key)."""
    ctx.setsockopt(zmq.CURVE_SERVERKEY, key.public)
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
    if authenticate:
        _ZapHandler(ctx, key).start()


def bind(sock: zmq.Socket[Any], addr: str) -> str:
    """Bind ``sock`` to ``addr`` and return the real endpoint (a port-0 bind picks its port
    here). A TCP bind from a secured context listens as a CURVE server; an unsecured TCP
    bind is allowed on a loopback address only."""
    if addr.startswith("tcp://"):
        if sock.getsockopt(zmq.MECHANISM) == zmq.CURVE:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            # Fail closed: with no ZAP handler running, libzmq would admit any client.
            sock.setsockopt(zmq.ZAP_DOMAIN, b"vserve")
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        elif not _is_loopback(addr):
            raise ClusterKeyError(f"refusing to listen on {addr} without authentication "
                                  "(no cluster key: see --cluster-key-file)")
    sock.bind(addr)
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _is_loopback(addr: str) -> bool:
    host = urlsplit(addr).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ZapHandler(threading.Thread):
    """libzmq's ZAP (RFC 27) for one context: CURVE clients whose public key is the
    cluster's pass; every other request is refused. Exits when the context terminates."""

    def __init__(self, ctx: zmq.Context[Any], key: ClusterKey) -> None:
        super().__init__(name="zap", daemon=True)
        # A plain (blocking) context over the same libzmq context: ``ctx`` may be asyncio's.
        self._ctx: zmq.Context[Any] = zmq.Context.shadow(ctx.underlying)
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)  # before any listening socket handshakes
        self._allowed = z85.decode(key.public)
        self.refused = 0

    def run(self) -> None:
        try:
            while True:
                frames = self._sock.recv_multipart()
                # version, request id, domain, address, identity, mechanism, credentials…
                request_id = frames[1] if len(frames) > 1 else b""
                ok = (len(frames) == 7 and frames[0] == b"1.0" and frames[5] == b"CURVE"
                      and frames[6] == self._allowed)
                if not ok:
                    self.refused += 1
                self._sock.send_multipart([
                    b"1.0", request_id, b"200" if ok else b"400",
                    b"OK" if ok else b"not a holder of the cluster key", b"", b""])
        except zmq.ContextTerminated:
            pass
        finally:
            self._sock.close(linger=0)
