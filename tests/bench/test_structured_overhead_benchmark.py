"""``benchmarks/structured_overhead.py --grammar-threads`` runs as documented (a real
subprocess, real grammars over the demo tokenizer): the grammar's host work per step, row by
row and on llguidance's threads, with compile times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grammar_work_by_thread_count(tmp_path: Path) -> None:
    out = tmp_path / "so.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "structured_overhead.py"),
                    "--model", "demo", "--batch", "4,16", "--grammar-threads", "0,1",
                    "--out", str(out)], check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert result["compile"]["compile_cold_ms"] > result["compile"]["compile_cached_ms_median"]
    rows = result["grammar_work"]
    assert [(r["batch"], r["threads"]) for r in rows] == [(4, 0), (4, 1), (16, 0), (16, 1)]
    assert all(r["fill_us"] > 0 and r["consume_us"] > 0 for r in rows), rows
    assert "decode" not in result  # no model was loaded or run
