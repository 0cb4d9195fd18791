"""Engines size torch's CPU threads to their share of the CPUs the server may use.

Units: the cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us``) and the affinity cap the
usable count; one core is left to the front end; engines on a node share the rest. End to
end: the engine's log says what it chose and why, and the engine process really runs that
many threads (counted from /proc after a request made torch start its pool)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import psutil
from helpers.serve import serve

from vserve.launch.cpus import cgroup_cpu_limit, engine_cpu_threads, usable_cpus


def test_cgroup_v2_and_v1_quotas(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    assert usable_cpus(tmp_path) == min(3, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(v1) == 0.5 and usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_threads_are_shared_among_engines() -> None:
    assert engine_cpu_threads(1, cpus=1) == 1
    assert engine_cpu_threads(1, cpus=2) == 1
    assert engine_cpu_threads(1, cpus=16) == 15
    assert engine_cpu_threads(2, cpus=16) == 7
    assert engine_cpu_threads(4, cpus=4) == 1


def _engine_threads(srv) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    r = httpx.post(srv.base_url + "/v1/completions",
                   json={"prompt": "The quick brown fox", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    (pid,) = srv.pids("engine").values()
    line = re.findall(r"CPU threads: .*", srv.log())
    assert line, srv.log()[-2000:]
    return psutil.Process(pid).num_threads(), line[-1]


def test_engine_runs_the_threads_it_says() -> None:
    with serve("demo", "--cpu-threads", "4") as srv:
        four, line = _engine_threads(srv)
        assert line.startswith("CPU threads: 4 (--cpu-threads)"), line
        # Where startup time went, said by the engine (issue 18: progress where people wait).
        log = srv.log()
        assert re.search(r"loaded [0-9.]+ GiB of weights from 1 file in [0-9.]+s", log), log
        assert re.search(r"engine 0 ready in [0-9.]+s \(model load [0-9.]+s, memory "
                         r"profiling [0-9.]+s, KV cache [0-9.]+s\)", log), log
    with serve("demo", env={"OMP_NUM_THREADS": "2"}) as srv:
        _, line = _engine_threads(srv)
        assert line.startswith("CPU threads: 2 ($OMP_NUM_THREADS)"), line
    expected = engine_cpu_threads(1)
    with serve("demo", env={"OMP_NUM_THREADS": ""}) as srv:
        auto, line = _engine_threads(srv)
        assert line.startswith(f"CPU threads: {expected} ("), line
        assert "usable CPU" in line
    # torch's pools (OpenMP and the one of its CPU kernels library) grow with the threads
    # asked for: at least threads - 1 more OS threads.
    assert four - auto >= 4 - expected, (four, auto, expected)
