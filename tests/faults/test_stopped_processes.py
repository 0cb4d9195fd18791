"""SIGSTOP of an API server and of the supervisor, under load (an engine's is in
test_engine_replacement): no client waits past its deadline, and nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from helpers.serve import serve, stream_completion, wait_started


def _complete_fresh(base: str, i: int) -> int:
    """A completion on a new connection, with a 10 s deadline."""
    r = httpx.post(base + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4},
                   headers={"Connection": "close"}, timeout=10)
    return r.status_code


def test_a_stopped_api_server_is_killed_and_replaced() -> None:
    with serve("demo", "--api-server-count", "2", "--api-server-heartbeat-timeout", "3") as srv:
        base = srv.base_url
        before = srv.pids("api_server")
        assert set(before) == {"0", "1"}
        with ThreadPoolExecutor(8) as pool:
            started = threading.Semaphore(0)
            streams = [pool.submit(stream_completion, base, 3500, 30, f"s{i}", started)
                       for i in range(6)]
            wait_started(started, 6)  # every stream generating, on either server
            stopped_at = time.monotonic()
            os.kill(before["0"], signal.SIGSTOP)
            # New clients are served by the other server meanwhile, none waits long.
            assert [_complete_fresh(base, i) for i in range(10)] == [200] * 10
            results = [f.result() for f in streams]
        # Streams held by the frozen server end when it is killed (a cut connection is all
        # a frozen process can give), well before their own 30 s deadline.
        assert time.monotonic() - stopped_at < 25
        assert any(r.error and "Timeout" not in r.error for r in results) or \
            all(r.server == "1" for r in results), results
        deadline = time.monotonic() + 30
        while srv.pids("api_server").get("0") in (None, before["0"]):
            assert time.monotonic() < deadline, "the stopped API server was not replaced"
            time.sleep(0.2)
        assert "has not answered" in srv.log()
        assert not psutil.pid_exists(before["0"]) or \
            psutil.Process(before["0"]).status() == psutil.STATUS_ZOMBIE
        assert [_complete_fresh(base, i) for i in range(10)] == [200] * 10


def test_a_stopped_supervisor_does_not_stop_serving() -> None:
    with serve("demo", "--api-server-count", "2", "--max-num-queued-reqs", "64") as srv:
        base = srv.base_url
        children = [p.pid for p in psutil.Process(srv.pid).children(recursive=True)]
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)  # the coordinator (a supervisor thread) is frozen too
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda i: _complete_fresh(base, i), range(20)))
            assert codes == [200] * 20
            assert httpx.get(base + "/ready", timeout=10).status_code == 200
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        assert [_complete_fresh(base, i) for i in range(4)] == [200] * 4
    # Stopped cleanly after it resumed: nothing left behind.
    time.sleep(0.5)
    assert [pid for pid in children if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE] == []
