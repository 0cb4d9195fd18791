"""Multi-node links are CURVE-authenticated: a peer without the cluster key is refused at
the handshake on every TCP port the head listens on.

Before, a fake process that sent ``EngineHello(1)`` to the head's RPC port was given the
configuration and every internal endpoint, and was then sent users' prompts.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import zmq
from helpers.serve import ServeProcess, two_node_args
from zmq.utils.monitor import recv_monitor_message

from vserve.cluster_key import ClusterKey, ClusterKeyError, bind, load_or_create, secure_context
from vserve.protocol import encode
from vserve.protocol.control import EngineHello


def _handshake(port: int, sock_type: int, key: ClusterKey | None = None,
               own_keypair: bool = False, hello: bytes | None = None,
               wait_s: float = 2.0) -> tuple[bool, bool]:
    """Connect a ``sock_type`` socket to 127.0.0.1:``port``: (the ZMTP handshake succeeded,
    a reply came back to ``hello``). ``key``: present it as a CURVE client; ``own_keypair``:
    know the server's public key but present a key pair of our own (what ZAP must refuse)."""
    ctx = zmq.Context()
    try:
        if key is not None:
            secure_context(ctx, key, authenticate=False)
            if own_keypair:
                public, secret = zmq.curve_keypair()
                ctx.setsockopt(zmq.CURVE_PUBLICKEY, public)
                ctx.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock = ctx.socket(sock_type)
        sock.setsockopt(zmq.LINGER, 0)
        if sock_type == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sock.get_monitor_socket()
        sock.connect(f"tcp://127.0.0.1:{port}")
        if hello is not None:
            sock.send(hello)
        replied = bool(hello is not None and sock.poll(int(wait_s * 1000)))
        succeeded = False
        deadline = time.monotonic() + (0.1 if replied else wait_s)
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                succeeded |= event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                if succeeded:
                    break
        monitor.close()
        sock.close()
        return succeeded, replied
    finally:
        ctx.destroy(linger=0)


def _listening_ports(pid: int) -> set[int]:
    ports = set()
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                ports.add(c.laddr.port)
    return ports


def test_only_holders_of_the_cluster_key_get_through(tmp_path: Path) -> None:
    common = two_node_args(tmp_path)
    key_file = Path(common[common.index("--cluster-key-file") + 1])
    rpc_port = int(common[common.index("--data-parallel-rpc-port") + 1])
    key = ClusterKey.load(key_file)
    stranger = ClusterKey.from_secret_text(secrets.token_urlsafe(48))
    hello = encode(EngineHello(1, 4242))
    head = ServeProcess(["demo", *common])
    headless: ServeProcess | None = None
    try:
        deadline = time.monotonic() + 60
        while rpc_port not in _listening_ports(head.pid):
            assert time.monotonic() < deadline and head.proc.poll() is None, head.log()
            time.sleep(0.2)
        # The head waits for engine 1. A spoofed HELLO gets nothing back without the key.
        assert _handshake(rpc_port, zmq.DEALER, hello=hello) == (False, False)
        assert _handshake(rpc_port, zmq.DEALER, stranger, hello=hello) == (False, False)
        assert _handshake(rpc_port, zmq.DEALER, key, own_keypair=True,
                          hello=hello) == (False, False)
        # The real node, holding the key, joins and the server serves.
        headless = ServeProcess(["demo", "--headless", "--data-parallel-start-rank", "1",
                                 *common])
        head.wait_serving()
        base = head.base_url
        http_port = int(base.rsplit(":", 1)[1])
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
        # Every TCP port the head listens on (the RPC port, the coordinator's two, each API
        # server's two) refuses the unauthenticated and the impostor; the key holder gets
        # through on at least one matching socket type, so each port really speaks ZMTP.
        ports = _listening_ports(head.pid) - {http_port}
        assert len(ports) >= 5, ports
        for port in ports:
            for sock_type in (zmq.DEALER, zmq.PUSH, zmq.SUB):
                assert not _handshake(port, sock_type, wait_s=0.5)[0], port
                assert not _handshake(port, sock_type, key, own_keypair=True,
                                      wait_s=0.5)[0], port
            assert any(_handshake(port, t, key, wait_s=2.0)[0]
                       for t in (zmq.DEALER, zmq.PUSH, zmq.SUB)), port
        # Nothing reached the server: it still serves both engines.
        health = httpx.get(base + "/health", timeout=10).json()
        assert health.get("engines_down", []) == [], health
        for i in range(4):
            r = httpx.post(base + "/v1/completions",
                           json={"prompt": f"again {i}", "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        head.stop()
        if headless is not None:
            headless.stop()


def test_multi_node_needs_a_key_and_a_headless_node_needs_the_file(tmp_path: Path) -> None:
    args = two_node_args(tmp_path)
    i = args.index("--cluster-key-file")
    without = args[:i] + args[i + 2:]
    cmd = [sys.executable, "-m", "vserve.cli.main", "serve", "demo"]
    r = subprocess.run([*cmd, *without], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--cluster-key-file" in r.stderr, r.stderr
    missing = [*without, "--cluster-key-file", str(tmp_path / "nope.key")]
    r = subprocess.run([*cmd, "--headless", "--data-parallel-start-rank", "1", *missing],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "nope.key" in r.stdout + r.stderr, r.stdout + r.stderr


def test_key_files(tmp_path: Path) -> None:
    key, created = load_or_create(tmp_path / "k")
    assert created and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    again, created = load_or_create(tmp_path / "k")
    assert again == key and not created
    (tmp_path / "short").write_text("too short")
    with pytest.raises(ClusterKeyError, match="at least 32"):
        ClusterKey.load(tmp_path / "short")
    ctx = zmq.Context()
    try:  # no key: TCP only on loopback
        with pytest.raises(ClusterKeyError, match="without authentication"):
            bind(ctx.socket(zmq.ROUTER), "tcp://0.0.0.0:0")
        assert bind(ctx.socket(zmq.ROUTER), "tcp://127.0.0.1:0").startswith("tcp://")
    finally:
        ctx.destroy(linger=0)
