"""`vserve serve` topology: one socket for N API servers, D engines, routing, links."""

from __future__ import annotations

import http.client
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from helpers.serve import serve
from helpers.sockets import listening_inodes, socket_inodes


def _complete(base: str, i: int, max_tokens: int = 8) -> httpx.Response:
    with httpx.Client(timeout=60) as c:  # a fresh connection each time
        return c.post(base + "/v1/completions",
                      json={"prompt": f"request {i}", "max_tokens": max_tokens,
                            "ignore_eos": True, "temperature": 0})


def test_n_api_servers_share_one_listening_socket():
    with serve("demo", "--api-server-count", "3") as srv:
        port = urlparse(srv.base_url).port
        assert port is not None
        listening = listening_inodes(port)
        assert len(listening) == 1, "exactly one listening socket for the port"
        inode = next(iter(listening))
        api_pids = [pid for pid, role in srv.process_names().items() if role == "api_server"]
        assert len(api_pids) == 3
        for pid in api_pids:
            assert inode in socket_inodes(pid), f"API server {pid} holds the socket"
        # The supervisor holds it too (to hand it to replacements) but serves no HTTP.
        assert inode in socket_inodes(srv.pid)
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: _complete(srv.base_url, i), range(60)))
        assert all(r.status_code == 200 for r in responses)
        servers = {r.headers["x-vserve-api-server"] for r in responses}
        assert len(servers) >= 2, f"only {servers} answered under concurrent load"


def test_keepalive_requests_are_not_delayed_by_nagle():
    with serve("demo", "--api-server-count", "2") as srv:
        url = urlparse(srv.base_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        body = b'{"prompt": "hi", "max_tokens": 1}'
        headers = {"Content-Type": "application/json"}
        for _ in range(5):  # warm up
            conn.request("POST", "/v1/completions", body, headers)
            conn.getresponse().read()
        times = []
        for _ in range(40):
            t0 = time.perf_counter()
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            assert resp.status == 200
        conn.close()
        times.sort()
        median = times[len(times) // 2]
        # Nagle + delayed ACK shows up as ~40 ms per request; without it this is ~1 ms.
        assert median < 0.015, f"median keep-alive latency {median * 1000:.1f} ms"


def test_two_engines_both_get_work():
    with serve("demo", "--api-server-count", "2", "--data-parallel-size", "2") as srv:
        engines = [psutil.Process(pid) for pid, role in srv.process_names().items()
                   if role == "engine"]
        assert len(engines) == 2
        before = [sum(p.cpu_times()[:2]) for p in engines]
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda i: _complete(srv.base_url, i, 48), range(48)))
        assert all(r.status_code == 200 for r in responses)
        used = [sum(p.cpu_times()[:2]) - b for p, b in zip(engines, before)]
        assert min(used) > 0.2, f"engine CPU seconds under load: {used}"


@pytest.mark.parametrize("host", ["::1"])
def test_ipv6(host):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with serve("demo", "--host", host) as srv:
        assert srv.base_url.startswith("http://[::1]:")
        r = httpx.get(srv.base_url + "/v1/models", timeout=10)
        assert r.status_code == 200


def test_unix_domain_socket(tmp_path):
    path = str(tmp_path / "vserve.sock")
    with serve("demo", "--uds", path, "--api-server-count", "2") as srv:
        assert srv.base_url == f"unix:{path}"
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, base_url="http://vserve") as c:
            deadline = time.monotonic() + 30
            while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert not os.path.exists(path), "the socket file is removed on shutdown"


def test_supervisor_never_loads_torch(tmp_path):
    """With an empty model cache, `vserve serve demo` builds the demo model in a child; the
    supervisor itself stays small and never maps libtorch."""
    home = tmp_path / "home"
    home.mkdir()
    with serve("demo", env={"HOME": str(home)}) as srv:
        assert list((home / ".cache" / "vserve").glob("demo-*/model.safetensors"))
        sup = psutil.Process(srv.pid)
        with open(f"/proc/{srv.pid}/maps") as f:
            assert "libtorch" not in f.read()
        rss_mb = sup.memory_info().rss / 2**20
        assert rss_mb < 100, f"supervisor RSS {rss_mb:.0f} MB"
        # The engines did load torch: the check above would have seen it there.
        engine = next(pid for pid, role in srv.process_names().items() if role == "engine")
        with open(f"/proc/{engine}/maps") as f:
            assert "libtorch" in f.read()
        assert httpx.get(srv.base_url + "/v1/models").status_code == 200
