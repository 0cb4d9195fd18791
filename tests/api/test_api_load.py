"""Client disconnects, server-wide backpressure and mid-stream failures, through a real
``vserve serve demo --api-server-count 2`` whose KV cache holds exactly one window.

A disconnect is checked on the engines' own series (``/metrics``): after the client goes,
the running count and the KV-cache usage return to zero, and the engine computed only the
tokens it made before the abort — a leaked request would have run to its end first, so the
check does not depend on how fast this machine is. The KV cache holding exactly one window
makes a prompt of almost a whole window (``FULL``) wait while any other request holds a
block; that is how the backpressure test fills the queue.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.serve import ServeProcess, serve
from prometheus_client.parser import text_string_to_metric_families

WINDOW = 4096  # long enough that the holder outlives the probes on a loaded machine
BLOCK = 16
QUEUE_BOUND = 2
LONG = {"prompt": "hello", "max_tokens": WINDOW - 16, "ignore_eos": True}
FULL = {"prompt": [65] * (WINDOW - 8), "max_tokens": 1}  # needs every KV block


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--api-server-count", "2", "--max-model-len", str(WINDOW),
               "--num-kv-blocks", str(WINDOW // BLOCK), "--block-size", str(BLOCK),
               "--max-num-queued-reqs", str(QUEUE_BOUND)) as s:
        yield s


def send_request(srv: ServeProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP/1.1 request, so the test controls exactly when the connection closes."""
    host, port = srv.base_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def send_admitted(srv: ServeProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """``send_request``, retried while the server answers 503 + Retry-After, as a client
    would: right after the backpressure test, an API server's view of the queue may lag
    the coordinator's by a snapshot (≤ 100 ms, longer on a loaded machine)."""
    deadline = time.monotonic() + 10
    while True:
        sock = send_request(srv, path, body)
        head = sock.recv(12, socket.MSG_PEEK)
        if not head.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
            return sock
        sock.close()
        time.sleep(0.2)


def read_events(sock: socket.socket, count: int) -> tuple[bytes, list[float]]:
    """Read until ``count`` SSE events arrived; (bytes, arrival time of each event)."""
    buf, times = b"", []
    while len(times) < count:
        chunk = sock.recv(65536)
        assert chunk, buf.decode(errors="replace")
        buf += chunk
        times += [time.monotonic()] * (buf.count(b"data: ") - len(times))
    return buf, times


def engine_state(srv: ServeProcess) -> tuple[float, float, float]:
    """(running requests, KV-cache usage, tokens computed since start), all engines, read
    from the engines' own series on /metrics."""
    r = httpx.get(srv.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    values = dict.fromkeys(("vserve_num_requests_running", "vserve_kv_cache_usage_ratio",
                            "vserve_iteration_tokens_sum"), 0.0)
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    running, usage, computed = values.values()
    return running, usage, computed


def engine_waiting(srv: ServeProcess) -> float:
    r = httpx.get(srv.base_url + "/metrics", timeout=10)
    return sum(s.value for f in text_string_to_metric_families(r.text) for s in f.samples
               if s.name == "vserve_num_requests_waiting")


def wait_engine(srv: ServeProcess, idle: bool, timeout: float = 300) -> float:
    """Wait until nothing runs and no KV block is held (idle) or something runs; returns the
    tokens computed so far."""
    deadline = time.monotonic() + timeout
    while True:
        running, usage, computed = engine_state(srv)
        if (running == 0 and usage == 0) if idle else running > 0:
            return computed
        assert time.monotonic() < deadline, (running, usage)
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_kv_blocks(srv: ServeProcess, stream: bool) -> None:
    """The engine's running count and KV usage return to zero after the client goes, and it
    computed only the tokens made before: a leaked request would be running until it had
    computed all of its ~2000 tokens, however fast or slow this machine is."""
    before = wait_engine(srv, idle=True)
    sock = send_request(srv, "/v1/completions", {**LONG, "stream": stream})
    if stream:
        read_events(sock, 40)
    else:  # nothing is sent until the end, so only http.disconnect can tell
        wait_engine(srv, idle=False)
    sock.close()
    after = wait_engine(srv, idle=True)
    # A leaked request computes all its tokens before it stops running; an aborted one only
    # those made before the disconnect was seen (tens here; the margin is for a loaded box,
    # where polling /metrics for "running" can itself take a while).
    assert after - before < LONG["max_tokens"] * 3 // 4, (before, after)
    # And the freed blocks are usable: a prompt that needs every block runs.
    r = httpx.post(srv.base_url + "/v1/completions", json=FULL, timeout=120)
    assert r.status_code == 200, r.text


def test_backpressure_is_server_wide(srv: ServeProcess) -> None:
    url = srv.base_url + "/v1/completions"
    holder = send_request(srv, "/v1/completions", {**LONG, "stream": True})
    read_events(holder, 2)  # running: it holds KV blocks, so FULL requests must wait
    waiting: list[httpx.Response] = []

    def wait_in_queue() -> None:
        waiting.append(httpx.post(url, json=FULL, timeout=120))

    threads = [threading.Thread(target=wait_in_queue) for _ in range(QUEUE_BOUND)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine_waiting(srv) < QUEUE_BOUND:  # the engine itself has both queued
        assert time.monotonic() < deadline, "the FULL requests never queued"
        time.sleep(0.05)
    time.sleep(0.5)  # the coordinator's next snapshot reaches every API server
    rejected_by: set[str] = set()
    # New connections, each kept open (its own client) so that the acceptors' balance sends
    # later ones to the other API server: closed ones could all land on whichever server
    # wakes first (the one not busy streaming the holder), however many were tried.
    fresh: list[httpx.Client] = []
    try:
        for _ in range(12):
            client = httpx.Client(timeout=10)
            fresh.append(client)
            start = time.monotonic()
            r = client.post(url, json={"prompt": "hi", "max_tokens": 1})
            assert r.status_code == 503, (r.text, [(w.status_code, w.text[:200]) for w in waiting])
            assert time.monotonic() - start < 5.0  # refused at once, not queued behind FULL
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 503
            rejected_by.add(r.headers["x-vserve-api-server"])
            if rejected_by == {"0", "1"}:
                break
    finally:
        for client in fresh:
            client.close()
    assert rejected_by == {"0", "1"}
    # The admitted requests are unaffected: the holder still streams, the queue drains.
    read_events(holder, 20)
    holder.close()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in waiting] == [200] * QUEUE_BOUND
    deadline = time.monotonic() + 10
    while True:  # admitted again once the snapshots show the queue empty
        r = httpx.post(url, json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_engine_death_mid_stream_is_an_error_event(srv: ServeProcess) -> None:
    """Runs last: it takes the server down."""
    sock = send_admitted(srv, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                          "max_tokens": 1000, "ignore_eos": True})
    buf, _ = read_events(sock, 3)
    engines = [pid for pid, role in srv.process_names().items() if role == "engine"]
    assert engines
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    sock.settimeout(30)
    while not (b"data: [DONE]\n\n" in buf and buf.endswith(b"0\r\n\r\n")):
        chunk = sock.recv(65536)
        assert chunk, "connection cut without an error event: " + buf[-300:].decode()
        buf += chunk
    sock.close()
    events = re.findall(rb"data: (.*?)\n\n", buf)
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "died" in error["message"], error
