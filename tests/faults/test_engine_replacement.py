"""An engine that dies or hangs is replaced in place while the others keep serving.

Each test runs a real `vserve serve`, kills or stops a real engine process under load, and
watches what clients, /health, /ready and /metrics see.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from helpers.serve import ServeProcess, serve, stream_completion, two_node_args, wait_started


def _engines(srv: ServeProcess) -> dict[str, int]:
    """rank → pid of the supervisor's engine children."""
    return srv.pids("engine")


def _health(base: str) -> tuple[int, dict]:
    try:
        r = httpx.get(base + "/health", timeout=5)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return -1, {}


def _wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _complete(base: str, prompt: str = "hello") -> int:
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 4},
                   timeout=30)
    return r.status_code


def _restarts(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vserve_engine_restarts_total{"):
            labels, value = line.rsplit(" ", 1)
            cause = labels.split('cause="')[1].split('"')[0]
            out[cause] = out.get(cause, 0.0) + float(value)
    return {cause: n for cause, n in out.items() if n}


# Streams still running when an engine is killed, which happens as soon as every stream has
# its first token: the demo model decodes 2,000-3,000 tokens/s per stream at these batches on
# two cores, so a stream lasts over a second (its context is 4,096 tokens).
STREAM_TOKENS = 3500


def test_killed_engine_is_replaced_while_the_other_keeps_serving():
    with serve("demo", "--data-parallel-size", "2", "--api-server-count", "2") as srv:
        base = srv.base_url
        victim = _engines(srv)["0"]
        with ThreadPoolExecutor(8) as pool:
            started = threading.Semaphore(0)
            streams = [pool.submit(stream_completion, base, STREAM_TOKENS, 90, f"story {i}",
                                   started) for i in range(8)]
            wait_started(started, 8)  # all streaming, about half on each engine
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # Liveness stays 200 and names the dead rank; new requests go to the other one.
            status, body = _wait_for(lambda: (lambda h: h if h[1].get("engines_down") else
                                              None)(_health(base)), 15, "engines_down")
            assert status == 200 and body == {"status": "healthy", "engines_down": [0]}
            assert httpx.get(base + "/ready", timeout=5).status_code == 200
            assert [_complete(base, f"during {i}") for i in range(6)] == [200] * 6
            results = [f.result() for f in streams]
        failed = [r for r in results if r.error is not None]
        finished = [r for r in results if r.error is None]
        # The dead engine's streams ended with an error event and [DONE]; the others ran to
        # the end untouched. Usually both kinds are there, but 8 streams started at once can
        # all be routed to one engine (they see the same load report), so either list may be
        # empty; a stream left hanging would end in the 90 s timeout's error, caught below.
        assert all(r.done for r in results), results
        assert all("engine" in (r.error or "") for r in failed), failed
        assert all(r.finish_reason == "length" for r in finished), finished
        # The replacement comes up for the same rank and is routed to again.
        _wait_for(lambda: _health(base) == (200, {"status": "healthy", "engines_down": []}),
                  60, "the replacement to be ready")
        new = _engines(srv)["0"]
        assert new != victim
        assert time.monotonic() - t_kill < 90
        before = sum(p.cpu_times()[0] for p in [psutil.Process(new)])
        assert [_complete(base, f"after {i}") for i in range(16)] == [200] * 16
        assert psutil.Process(new).cpu_times()[0] > before, "the replacement gets requests"
        assert _restarts(base) == {"killed": 1.0}
        assert "killed by SIGKILL" in srv.log()
    assert srv.leftovers() == []


def test_stopped_engine_is_killed_and_replaced_and_its_streams_released():
    """SIGSTOP: the process lives but its busy loop reports nothing; after the heartbeat
    timeout it is killed and replaced, and its clients get an error, not a frozen stream."""
    with serve("demo", "--data-parallel-size", "2", "--engine-heartbeat-timeout", "3") as srv:
        base = srv.base_url
        victim = _engines(srv)["1"]
        with ThreadPoolExecutor(6) as pool:
            started = threading.Semaphore(0)
            streams = [pool.submit(stream_completion, base, STREAM_TOKENS, 60, f"tale {i}",
                                   started) for i in range(6)]
            wait_started(started, 6)
            t_stop = time.monotonic()
            os.kill(victim, signal.SIGSTOP)
            results = [f.result() for f in streams]
        failed = [r for r in results if r.error is not None]
        assert failed and all(r.done for r in results), results
        assert all("stopped answering" in (r.error or "") for r in failed), failed
        _wait_for(lambda: _health(base) == (200, {"status": "healthy", "engines_down": []}),
                  60, "the replacement to be ready")
        assert time.monotonic() - t_stop < 60
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
        assert _restarts(base) == {"hung": 1.0}
        assert [_complete(base, f"after {i}") for i in range(8)] == [200] * 8
    assert srv.leftovers() == []


def test_single_engine_restart_then_crash_loop_stops_the_server():
    """One engine: while it is replaced the server is alive but not ready (503 with a
    reason); a second death past --max-engine-restarts 1 stops the server non-zero."""
    with serve("demo", "--max-engine-restarts", "1") as srv:
        base = srv.base_url
        os.kill(_engines(srv)["0"], signal.SIGKILL)
        _wait_for(lambda: _health(base)[1].get("engines_down") == [0], 5, "engines_down")
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=10)
        if r.status_code == 503:  # unless the replacement was already up
            assert "restarting" in r.json()["error"]["message"]
            assert httpx.get(base + "/ready", timeout=5).status_code == 503
        _wait_for(lambda: _health(base)[1].get("engines_down") == [], 60, "the replacement")
        assert _complete(base) == 200
        os.kill(_engines(srv)["0"], signal.SIGKILL)
        assert srv.proc.wait(30) != 0
        assert "not replaced" in srv.log() and "--max-engine-restarts 1" in srv.log()
    assert srv.leftovers() == []



def test_remote_engine_death_is_noticed_at_once_and_its_node_replaces_it(tmp_path: Path) -> None:
    common = two_node_args(tmp_path)
    headless = ServeProcess(["demo", "--headless", "--data-parallel-start-rank", "1", *common])
    try:
        with serve("demo", *common) as head:
            base = head.base_url
            remote = _engines(headless)["1"]
            with ThreadPoolExecutor(6) as pool:
                started = threading.Semaphore(0)
                streams = [pool.submit(stream_completion, base, STREAM_TOKENS, 60,
                                       f"remote {i}", started) for i in range(6)]
                wait_started(started, 6)
                t_kill = time.monotonic()
                os.kill(remote, signal.SIGKILL)
                _wait_for(lambda: _health(base)[1].get("engines_down") == [1], 5,
                          "the head to notice")
                assert time.monotonic() - t_kill < 5
                assert [_complete(base, f"x{i}") for i in range(4)] == [200] * 4
                results = [f.result() for f in streams]
            assert all(r.done for r in results), results
            assert any(r.error for r in results) and any(not r.error for r in results)
            # The node started a new engine for rank 1; it rejoined the head.
            _wait_for(lambda: _health(base)[1].get("engines_down") == [], 60, "the rejoin")
            assert _engines(headless)["1"] != remote
            assert [_complete(base, f"y{i}") for i in range(8)] == [200] * 8
        # The head's shutdown reaches the node: it stops too, cleanly.
        assert headless.proc.wait(30) == 0
    finally:
        headless.kill_all()


def test_remote_node_silence_is_routed_around(tmp_path: Path) -> None:
    common = two_node_args(tmp_path)
    headless = ServeProcess(["demo", "--headless", "--data-parallel-start-rank", "1", *common])
    try:
        with serve("demo", "--engine-heartbeat-timeout", "3", *common) as head:
            base = head.base_url
            node = [headless.pid, *(p.pid for p in
                                    psutil.Process(headless.pid).children(recursive=True))]
            try:
                for pid in node:  # the node freezes whole: nobody reports anything
                    os.kill(pid, signal.SIGSTOP)
                t_stop = time.monotonic()
                _wait_for(lambda: _health(base)[1].get("engines_down") == [1], 10,
                          "the head to notice the silence")
                assert time.monotonic() - t_stop < 8
                assert _health(base)[0] == 200
                assert [_complete(base, f"z{i}") for i in range(6)] == [200] * 6
            finally:
                for pid in node:
                    os.kill(pid, signal.SIGCONT)
            # Woken, the engine finds the head's order to make way; its node replaces it,
            # and the replacement joins.
            _wait_for(lambda: _health(base)[1].get("engines_down") == [], 60, "the rejoin")
            assert [_complete(base, f"w{i}") for i in range(8)] == [200] * 8
            assert "went silent and the head gave up on it" in headless.log()
    finally:
        headless.kill_all()
