"""How many CPUs this process may really use, and how many threads an engine gets.

``os.cpu_count()`` is the machine's; a container or a ``taskset`` sees fewer. The usable
count is the smaller of the affinity mask and the cgroup CPU quota (cgroup v2 ``cpu.max``,
or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in CPUs, or None when there is none (or no cgroup)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def engine_cpu_threads(local_engines: int, cpus: int | None = None) -> int:
    """Threads for each of ``local_engines`` engines on this node: the usable CPUs less one
    for the front end (API servers, supervisor), shared among the engines; at least one.

    More threads than cores only makes torch's OpenMP workers spin against each other and
    against the front end: on the 2-core machine, with other work running, 2 threads took
    10-60x longer per step than 1."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, (cpus - 1) // max(1, local_engines))
