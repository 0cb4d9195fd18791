"""The operator findings of the reliability review, each reproduced against a real server:
every one of these failed before its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import zmq
from helpers.serve import VSERVE, ServeProcess, serve

from vserve.protocol import encode
from vserve.protocol.outputs import EngineDead


@pytest.fixture(scope="module")
def srv():
    with serve("demo", "--max-model-len", "512") as s:
        yield s


def _raw(host: str, port: int, body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, rest[:length]


def test_lone_surrogate_in_a_key_is_a_400_and_keeps_the_connection(srv: ServeProcess) -> None:
    url = httpx.URL(srv.base_url)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        bad = b'{"model": "demo", "prompt": "hi", "max_tokens": 2, "logit_bias": {"\\ud800": 1}}'
        sock.sendall(_raw(url.host, url.port, bad))
        status, body = _read_response(sock)
        assert status == 400, body
        assert "Unicode" in json.loads(body)["error"]["message"]
        # The same kept-alive connection still serves.
        sock.sendall(_raw(url.host, url.port, b'{"model": "demo", "prompt": "hi", '
                                              b'"max_tokens": 2}'))
        status, body = _read_response(sock)
        assert status == 200, body


def test_health_and_ready_answer_json(srv: ServeProcess) -> None:
    h = httpx.get(srv.base_url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "healthy", "engines_down": []}
    r = httpx.get(srv.base_url + "/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_the_startup_line_counts_in_words(srv: ServeProcess) -> None:
    assert "vserve is serving demo on " in srv.log()
    assert " with 1 API server and 1 engine\n" in srv.log()


def test_a_prompt_list_counts_against_n(srv: ServeProcess) -> None:
    url = srv.base_url + "/v1/completions"
    huge = httpx.post(url, json={"prompt": ["x"] * 10_000, "max_tokens": 1}, timeout=30)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"
    assert "10000 prompts" in huge.json()["error"]["message"]
    over = httpx.post(url, json={"prompt": ["a"] * 10, "n": 13, "max_tokens": 1}, timeout=30)
    assert over.status_code == 400
    fits = httpx.post(url, json={"prompt": ["a"] * 10, "n": 12, "max_tokens": 1}, timeout=60)
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 120


def test_outputs_naming_an_engine_the_server_does_not_have_are_dropped(
        srv: ServeProcess) -> None:
    """A valid-shaped EngineDead for engine 7 (there is one engine) used to make the API
    server answer 503 forever."""
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"ipc://{srv.run_dir()}/ipc/output-0")
        for _ in range(3):
            push.send(encode(EngineDead(7, "spoofed")))
        time.sleep(0.5)
    finally:
        ctx.destroy(linger=1000)
    assert httpx.get(srv.base_url + "/health").status_code == 200
    r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_an_empty_api_key_is_refused_at_startup() -> None:
    for argv, env in ((["--api-key", ""], {}), ([], {"VSERVE_API_KEY": ""})):
        proc = subprocess.run([*VSERVE, "demo", "--port", "0", *argv], capture_output=True,
                              text=True, timeout=120, env={**os.environ, **env})
        assert proc.returncode == 2, proc.stderr
        assert "API key must not be empty" in proc.stderr


def test_api_keys_from_a_file_stay_off_every_command_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("first-secret\n\nsecond-secret\n")
    with serve("demo", "--api-key-file", str(keys)) as s:
        url = s.base_url + "/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer second-secret"}
                         ).status_code == 200
        for p in [psutil.Process(s.pid), *s.children]:
            assert "secret" not in " ".join(p.cmdline())


def test_the_working_directory_is_not_on_the_childrens_import_path(tmp_path: Path) -> None:
    """A module named like one vserve imports, in the directory `vserve serve` starts in,
    must not be imported by the children (it was, by the engine)."""
    for name in ("grp", "uuid", "secrets"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('imported from the cwd')\n")
    # The installed script, as a user runs it (``python -m`` would put the cwd on the
    # supervisor's own path, which is Python's doing, not vserve's).
    script = str(Path(sys.executable).parent / "vserve")
    s = ServeProcess(["demo", "--port", "0"], cwd=tmp_path, command=[script, "serve"])
    try:
        s.wait_serving()
        r = httpx.post(s.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert "imported from the cwd" not in s.log()
    finally:
        s.stop()


def test_a_client_connecting_during_startup_is_refused_not_held() -> None:
    """The port is bound at once (a taken port fails the start) but listens only when every
    engine is ready: a probe during startup is refused at once, it does not hang."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    srv = ServeProcess(["demo", "--port", str(port)])
    try:
        held = []
        refused = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
            except httpx.ConnectError:
                refused += 1
                time.sleep(0.05)
                continue
            held.append(time.monotonic() - t0)
            if r.status_code == 200:
                break
        assert held, "the server never answered"
        assert refused > 0, "no connection attempt happened during startup"
        assert max(held) < 1.0, f"a connection made during startup was held {max(held):.1f}s"
    finally:
        srv.stop()
