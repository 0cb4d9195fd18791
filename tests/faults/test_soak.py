"""A soak under a mix of requests (plain, streamed, n=2, disconnects, refusals): no process's
memory grows past a stated bound. ``benchmarks/soak.py --requests 20000`` is the long form
(figures in docs/design/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402

REQUESTS = 4000
# Measured over 20,000 requests on the 2-core machine: engine +64 KiB, API servers
# +2.2 MiB each — the tokenizers library's BPE cache of up to 10,000 distinct words (every
# prompt here has a new one), which stops growing at about 3.5 MiB for the demo tokenizer.
ENGINE_BOUND_KIB = 2048
API_SERVER_BOUND_KIB = 2048


def test_soak_memory_stays_bounded() -> None:
    result = soak.run(requests=REQUESTS, warmup=1000, api_servers=2, concurrency=32,
                      num_kv_blocks=1024)
    assert result["failed"] == 0, result
    for name, rss in result["rss_kib"].items():
        growth = rss["after"] - rss["before"]
        bound = ENGINE_BOUND_KIB if name.startswith("engine") else API_SERVER_BOUND_KIB
        assert growth < bound, (name, growth, result)
