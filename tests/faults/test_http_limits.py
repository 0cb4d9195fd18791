"""What a client can make an API server hold before any route runs, each bounded.

Measured before these limits: a 300 MB header was read in full; connections that sent part
of a header, part of a body, or nothing stayed open 30–62 s and more; with `ulimit -n 256`,
600 idle connections made /health fail 3 of 4 times; one 8 MB prompt held its server's
event loop about 6 s and peaked at 1.6–2.0 GB before being refused.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from helpers.serve import ServeProcess, serve

HEADER_TIMEOUT = 2
BODY_TIMEOUT = 2


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--max-model-len", "512", "--http-header-timeout", str(HEADER_TIMEOUT),
               "--http-body-timeout", str(BODY_TIMEOUT), "--max-header-bytes", "16KiB",
               "--max-header-count", "50") as s:
        yield s


def _connect(srv: ServeProcess) -> socket.socket:
    host, port = srv.base_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; (bytes, seconds it took)."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    buf = b""
    try:
        while chunk := sock.recv(65536):
            buf += chunk
    except ConnectionResetError:
        pass
    return buf, time.monotonic() - start


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else -1


def _error(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


def test_oversized_headers_get_431(srv: ServeProcess) -> None:
    sock = _connect(srv)
    # One header that never ends: refused once past the bound, not read to its end.
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        for _ in range(200):  # up to 12.8 MB, if the server kept reading
            sock.sendall(b"a" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    response, _ = _read_until_closed(sock, 10)
    assert sent < 4 << 20, f"the server read {sent} bytes of one header"
    assert _status(response) == 431, response[:200]
    assert _error(response)["code"] == 431
    sock.close()
    # Too many header fields, each small.
    sock = _connect(srv)
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(60))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    response, _ = _read_until_closed(sock, 10)
    assert _status(response) == 431 and b"header fields" in response, response[:300]
    # Under both bounds: served.
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(40))
    sock = _connect(srv)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields
                 + b"\r\n")
    response, _ = _read_until_closed(sock, 10)
    assert _status(response) == 200, response[:300]


def test_silent_and_partial_connections_are_closed(srv: ServeProcess) -> None:
    silent = _connect(srv)
    partial_head = _connect(srv)
    partial_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    partial_body = _connect(srv)
    partial_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    results: dict[str, tuple[bytes, float]] = {}

    def watch(name: str, sock: socket.socket) -> None:
        results[name] = _read_until_closed(sock, 30)

    threads = [threading.Thread(target=watch, args=item) for item in
               (("silent", silent), ("head", partial_head), ("body", partial_body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert results["silent"][0] == b""  # closed without a word: it never asked anything
    assert _status(results["head"][0]) == 408, results["head"]
    assert _status(results["body"][0]) == 408, results["body"]
    assert "stalled" in _error(results["body"][0])["message"]
    for name, (_, took) in results.items():
        assert took < HEADER_TIMEOUT + BODY_TIMEOUT + 8, (name, took)
    # A slow but steady client is not cut: a body sent in pieces, each within the timeout.
    sock = _connect(srv)
    body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 8):
        time.sleep(BODY_TIMEOUT / 3)
        sock.sendall(body[i:i + 8])
    response, _ = _read_until_closed(sock, 30)
    assert _status(response) == 200, response[:300]


def test_an_oversized_prompt_is_refused_cheaply(srv: ServeProcess) -> None:
    api = [p for p in psutil.Process(srv.pid).children(recursive=True)
           if "vserve.api.server" in " ".join(p.cmdline())]
    rss_before = max(p.memory_info().rss for p in api)
    prompt = "hello world " * 600_000  # 7.2 MB of text, for a 512-token window
    start = time.monotonic()
    r = httpx.post(srv.base_url + "/v1/completions",
                   json={"prompt": prompt, "max_tokens": 4}, timeout=60)
    took = time.monotonic() - start
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert took < 3.0, f"refusing it took {took:.1f}s"  # before: about 6 s
    r = httpx.post(srv.base_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    growth = max(p.memory_info().rss for p in api) - rss_before
    assert growth < 400 << 20, f"the API server grew {growth >> 20} MiB"  # before: ~1.7 GB
    # A prompt just under the window is still served.
    r = httpx.post(srv.base_url + "/v1/completions",
                   json={"prompt": "hello " * 50, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


def test_idle_connections_cannot_exhaust_file_descriptors() -> None:
    """`ulimit -n 256` and 600 idle connections: /health is still answered, every time."""
    shell = ["bash", "-c", 'ulimit -n 256 && exec "$@"', "vserve",
             sys.executable, "-m", "vserve.cli.main", "serve"]
    srv = ServeProcess(["demo", "--api-server-count", "1", "--port", "0"], command=shell)
    idle: list[socket.socket] = []
    try:
        srv.wait_serving()
        host, port = srv.base_url.removeprefix("http://").rsplit(":", 1)
        for _ in range(600):
            idle.append(socket.create_connection((host, int(port)), timeout=30))
        time.sleep(0.5)
        for _ in range(4):
            start = time.monotonic()
            r = httpx.get(srv.base_url + "/health", timeout=10)
            assert r.status_code == 200, r.text
            assert time.monotonic() - start < 5
        r = httpx.post(srv.base_url + "/v1/completions",
                       json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        assert "Too many open files" not in srv.log()
    finally:
        for s in idle:
            s.close()
        srv.stop()
