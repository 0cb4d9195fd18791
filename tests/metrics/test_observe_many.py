"""``observe_many`` (a finished request's inter-token gaps in one pass) exposes exactly what
separate ``observe`` calls would: same buckets (a value on a bound counts in that bucket),
count and sum — in this process's value store and in prometheus_client's multiprocess one."""

from __future__ import annotations

import math
import random
import subprocess
import sys

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from vserve.metrics.request_metrics import observe_many

_BOUNDS = [0.001, 0.0025, 0.01, 0.5]


def _values(seed: int) -> list[float]:
    rng = random.Random(seed)
    values = [rng.expovariate(200.0) for _ in range(400)]
    values += [rng.choice(_BOUNDS) for _ in range(50)]  # on a bound: "<=" counts it there
    values += [0.0, 7.0, 1e9]  # above every finite bound: the +Inf bucket
    rng.shuffle(values)
    return values


def _exposition(values: list[float], bulk: bool) -> list[str]:
    registry = CollectorRegistry()
    child = Histogram("gaps", "test", ["model_name"], buckets=_BOUNDS,
                      registry=registry).labels("m")
    if bulk:
        observe_many(child, values[:200])
        observe_many(child, [])
        observe_many(child, values[200:])
    else:
        for v in values:
            child.observe(v)
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def _same(bulk: list[str], separate: list[str]) -> None:
    """Equal expositions, except that a sum may be added up in another order."""
    assert len(bulk) == len(separate)
    for got, want in zip(bulk, separate):
        if got.startswith("gaps_sum"):
            assert math.isclose(float(got.split()[-1]), float(want.split()[-1]), rel_tol=1e-12)
        else:
            assert got == want


def test_observe_many_matches_separate_observations(fresh_seed: int):
    values = _values(fresh_seed)
    separate, bulk = _exposition(values, False), _exposition(values, True)
    assert any('le="0.0025"' in line and not line.endswith(" 0.0") for line in separate)
    _same(bulk, separate)


_MULTIPROCESS = """
import sys
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from vserve.metrics.request_metrics import observe_many
values = [float(v) for v in sys.argv[1].split(",")]
bulk = sys.argv[2] == "bulk"
child = Histogram("gaps", "test", ["model_name"], buckets=[0.001, 0.0025, 0.01, 0.5]).labels("m")
if bulk:
    observe_many(child, values)
else:
    for v in values:
        child.observe(v)
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def test_observe_many_in_multiprocess_mode(tmp_path, fresh_seed: int):
    """The API servers' store: values written to memory-mapped files, summed by the
    collector that answers a scrape."""
    values = ",".join(repr(v) for v in _values(fresh_seed)[:120])
    out = {}
    for mode in ("separate", "bulk"):
        d = tmp_path / mode
        d.mkdir()
        run = subprocess.run([sys.executable, "-c", _MULTIPROCESS, values, mode],
                             env={"PROMETHEUS_MULTIPROC_DIR": str(d), "PATH": "/usr/bin"},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        out[mode] = sorted(line for line in run.stdout.splitlines() if line.startswith("gaps"))
    assert any(line.startswith("gaps_count") and not line.endswith(" 0.0")
               for line in out["separate"]), out
    _same(out["bulk"], out["separate"])
