"""Kept-alive connections spread over every API server of the one listening socket, burst
after burst, and a replaced API server takes new connections again."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
from helpers.serve import ServeProcess, serve

from vserve.launch.connections import ConnectionTable
from vserve.roles import process_role

N_SERVERS = 4
BURST = 64


def _open(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections opened at once (non-blocking connects, then wait)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks.append(s)
    for s in socks:
        s.setblocking(True)
        s.settimeout(30)
    return socks


def _server_of(sock: socket.socket) -> str:
    """Ask on a kept-alive connection which API server holds it."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    for line in head.split("\r\n"):
        if line.startswith("x-vserve-api-server:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(head)


def _burst(srv: ServeProcess, n: int) -> tuple[list[socket.socket], Counter[str]]:
    url = urlparse(srv.base_url)
    assert url.hostname and url.port
    socks = _open(url.hostname, url.port, n)
    with ThreadPoolExecutor(16) as pool:
        owners = Counter(pool.map(_server_of, socks))
    return socks, owners


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _connections_table(srv: ServeProcess, num_servers: int = N_SERVERS) -> ConnectionTable:
    return ConnectionTable(os.path.join(srv.run_dir(), "connections"), num_servers)


def _wait_all_accepting(table: ConnectionTable, timeout: float = 30) -> None:
    """Every server's acceptor is up (``/ready`` answering says only that one is)."""
    deadline = time.monotonic() + timeout
    while None in table.live_counts() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert None not in table.live_counts(), table.live_counts()


def _wait_closed(table: ConnectionTable, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while sum(c or 0 for c in table.live_counts()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(c or 0 for c in table.live_counts()) == 0, table.live_counts()


def test_bursts_of_kept_alive_connections_spread_over_every_server():
    fair = BURST / N_SERVERS
    with serve("demo", "--api-server-count", str(N_SERVERS)) as srv:
        table = _connections_table(srv)
        _wait_all_accepting(table)
        for burst in range(3):
            socks, owners = _burst(srv, BURST)
            try:
                assert set(owners) == {str(i) for i in range(N_SERVERS)}, (burst, owners)
                assert all(fair / 2 <= held <= fair * 1.5 for held in owners.values()), (
                    burst, owners)
                # The table every server reads agrees with what the clients saw.
                assert sorted(table.live_counts()) == sorted(owners.values())
            finally:
                _close_all(socks)
            _wait_closed(table)
        table.close()


def test_a_replaced_api_server_takes_new_connections():
    with serve("demo", "--api-server-count", "2") as srv:
        table = _connections_table(srv, 2)
        _wait_all_accepting(table)
        held, owners = _burst(srv, 16)
        try:
            assert set(owners) == {"0", "1"}
            victim = next(p for p in srv.children if process_role(p.cmdline()) is not None
                          and process_role(p.cmdline())[0] == "api_server")
            index = int(process_role(victim.cmdline())[1])
            victim.kill()
            deadline = time.monotonic() + 60
            # The supervisor marks it absent, then the replacement writes its slot (0).
            while table.live_counts()[index] != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert table.live_counts()[index] == 0, table.live_counts()
            more, new_owners = _burst(srv, 16)
            try:
                # It holds none of the survivor's connections, so it takes most new ones.
                assert new_owners[str(index)] >= 8, new_owners
            finally:
                _close_all(more)
        finally:
            _close_all(held)
            table.close()
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
