"""``benchmarks/engine_host.py`` runs as documented (a real subprocess, the real engine in
benchmark mode): constrained rows over the synthetic 128k vocabulary, paced by a simulated
device, report every phase and how busy the device was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_host_constrained_rows_on_a_simulated_device(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_host.py"),
                    "--fake-compute", "--async-scheduling", "--rows", "constrained",
                    "--stagger", "--step-ms", "2", "--batch", "4", "--num-requests", "24",
                    "--output-len", "8", "--out", str(out)],
                   check=True, timeout=300, capture_output=True)
    [row] = json.loads(out.read_text())
    assert row["batch"] == 4 and row["steps"] > 0 and row["tokens"] > 0
    assert set(row["us_per_step"]) == {"receive", "schedule", "execute", "read_back",
                                       "update", "prepare", "serialize", "total"}
    # The device can never be busier than the run was long.
    assert 0 < row["device_busy"] <= 1.01, row["device_busy"]
    # Each step waits for its 2 ms on the simulated device.
    assert row["us_per_step"]["total"] >= 2000 * 0.99, row["us_per_step"]
