"""How the server goes down, seen from clients with streams in flight."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from helpers.serve import serve, stream_completion, wait_started


def test_sigterm_to_the_whole_process_group_drains_like_sigterm_to_the_supervisor():
    """systemd and some container runtimes signal every process of the group: the engines
    must keep serving while the API servers drain (they used to stop first, stranding every
    stream for the whole --shutdown-timeout)."""
    with serve("demo", "--api-server-count", "2", "--shutdown-timeout", "60") as srv:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream_completion, srv.base_url, 300, 120)
                       for _ in range(4)]
            time.sleep(1.0)  # all four are generating
            t0 = time.monotonic()
            os.killpg(srv.pid, signal.SIGTERM)  # the group: supervisor, servers, engine
            results = [f.result() for f in futures]
        assert all(r.error is None and r.finish_reason == "length" and r.done
                   for r in results), results
        assert time.monotonic() - t0 < 50, "drained well before the shutdown timeout"
        assert srv.proc.wait(60) == 0
        assert srv.leftovers() == []


def test_teardown_ends_every_stream_with_an_error_event_and_done():
    """An engine dies and the server stops: streams on the dead engine and on the healthy
    one alike end with an error event and [DONE] (those on the healthy one used to be cut
    when the API servers were killed)."""
    # A short grace before the teardown, and the kill as soon as every stream has its first
    # token: the healthy engine's streams (4,000 tokens; the demo model decodes 2,000-3,000
    # tokens/s per stream at this batch) must still be running when the teardown comes.
    with serve("demo", "--data-parallel-size", "2", "--api-server-count", "2",
               "--max-engine-restarts", "0",
               env={"VSERVE_ENGINE_DEATH_GRACE": "0.5"}) as srv:
        engine = next(pid for pid, role in srv.process_names().items() if role == "engine")
        started = threading.Semaphore(0)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream_completion, srv.base_url, 4000, 60, started=started)
                       for _ in range(6)]
            wait_started(started, 6)
            os.kill(engine, signal.SIGKILL)
            results = [f.result() for f in futures]
        assert all(r.error is not None and r.done for r in results), results
        assert any("shutting down" in (r.error or "") or "stopping" in (r.error or "")
                   for r in results), results  # some were on the healthy engine
        assert srv.proc.wait(60) != 0
        assert srv.leftovers() == []
