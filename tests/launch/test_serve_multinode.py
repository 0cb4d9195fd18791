"""Data parallelism across two `vserve serve` process groups joined over TCP (127.0.0.1)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from helpers.serve import ServeProcess, serve, two_node_args


def test_headless_engine_joins_head_over_tcp(tmp_path: Path) -> None:
    common = two_node_args(tmp_path)
    headless = ServeProcess(["demo", "--headless", "--data-parallel-start-rank", "1", *common])
    try:
        with serve("demo", "--api-server-count", "2", *common) as head:
            remote = [p for p in psutil.Process(headless.pid).children(recursive=True)
                      if "vserve.engine.core_proc" in " ".join(p.cmdline())]
            local = [psutil.Process(pid) for pid, role in head.process_names().items()
                     if role == "engine"]
            assert len(remote) == 1 and len(local) == 1
            assert "--engine-index" in remote[0].cmdline()
            before = [sum(p.cpu_times()[:2]) for p in (local[0], remote[0])]
            with ThreadPoolExecutor(16) as pool:
                rs = list(pool.map(lambda i: httpx.post(
                    head.base_url + "/v1/completions",
                    json={"prompt": f"p{i}", "max_tokens": 48, "ignore_eos": True},
                    timeout=60), range(48)))
            assert [r.status_code for r in rs] == [200] * 48
            used = [sum(p.cpu_times()[:2]) - b for p, b in zip((local[0], remote[0]), before)]
            assert min(used) > 0.2, f"engine CPU seconds (local, remote): {used}"
        # The head told the remote engine to stop; the headless node follows.
        assert headless.proc.wait(30) == 0
    finally:
        headless.stop()
