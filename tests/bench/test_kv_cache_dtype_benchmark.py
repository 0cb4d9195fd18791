"""``benchmarks/kv_cache_dtype.py`` runs as documented (a real subprocess, the demo model on
the CPU): both cache dtypes measured, float8 holding four times float32's blocks, and the
teacher-forced quality figures (the float8 cache moves the logprobs of the same tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_auto_against_fp8(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_cache_dtype.py"),
                    "--prompts", "3", "--prompt-len", "20", "--tokens", "6", "--rounds", "1",
                    "--out", str(out)], check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert result["auto"]["tokens_per_s_median"] > 0 and result["fp8"]["tokens_per_s_median"] > 0
    assert result["fp8"]["kv_blocks"] == 4 * result["auto"]["kv_blocks"]  # demo: float32
    forced = result["teacher_forced"]
    assert forced["tokens"] == 3 * 6
    assert forced["top1_auto"] > 0.9  # auto scoring its own greedy tokens
    assert 0.0 <= forced["top1_fp8"] <= 1.0
    assert 0.0 < forced["logprob_abs_diff_mean"] <= forced["logprob_abs_diff_max"]
