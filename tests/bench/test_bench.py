"""`vserve bench serve`: against a real `vserve serve demo` (exact token counts, streaming and
not, completions and chat), and against the canned stub server with known delays (the
TTFT/ITL/TPOT arithmetic), plus the metric helpers, JSONL prompts, failures and the PNG."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serve import serve

from vserve.bench.cli import add_bench_serve_args
from vserve.bench.metrics import RequestResult, percentile, summarize, time_series
from vserve.bench.runner import run_benchmark

IN_LEN, OUT_LEN = 24, 8


def bench(*argv: str) -> dict[str, Any]:
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    args = p.parse_args([*argv, "--disable-tqdm", "--quiet"])
    return run_benchmark(args, log=lambda m: None)


def check_ordered(res: dict[str, Any], metric: str) -> None:
    vals = [res[f"{k}_{metric}_ms"] for k in ("min", "median", "p90", "p99", "max")]
    assert all(v is not None for v in vals), (metric, vals)
    # ITL may be 0: events that arrive in one read share a timestamp.
    assert vals[0] >= 0 and vals[-1] > 0 and (metric == "itl" or vals[1] > 0), (metric, vals)
    assert vals == sorted(vals), (metric, vals)
    assert res[f"min_{metric}_ms"] <= res[f"mean_{metric}_ms"] <= res[f"max_{metric}_ms"]


# -- against vserve -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vserve_url() -> Iterator[str]:
    with serve("demo", "--api-server-count", "2") as srv:
        yield srv.base_url


@pytest.mark.parametrize("endpoint,stream", [("completions", False), ("completions", True),
                                             ("chat", True), ("chat", False)])
def test_vserve_exact_counts(vserve_url: str, endpoint: str, stream: bool) -> None:
    n = 6
    res = bench("--base-url", vserve_url, "--endpoint-type", endpoint,
                "--stream" if stream else "--no-stream", "--num-prompts", str(n),
                "--input-len", str(IN_LEN), "--output-len", str(OUT_LEN),
                "--max-concurrency", "3", "--num-warmups", "1", "--save-detailed")
    assert res["completed"] == n and res["failed"] == 0, res.get("errors")
    assert res["prompt_source"] == "random (exact, server /tokenize)"
    assert res["prompt_lengths_exact"] is True
    assert res["usage_reported"] is True
    assert res["total_input_tokens"] == n * IN_LEN
    assert res["total_output_tokens"] == n * OUT_LEN  # ignore_eos
    assert all(r["prompt_tokens"] == IN_LEN and r["output_tokens"] == OUT_LEN
               for r in res["requests"])
    assert res["request_throughput"] > 0 and res["output_throughput"] > 0
    check_ordered(res, "e2el")
    if stream:
        for m in ("ttft", "itl", "tpot"):
            check_ordered(res, m)
        assert 0 < res["total_chunks"] <= n * OUT_LEN
        for r in res["requests"]:
            assert 0 < r["ttft"] <= r["latency"]
            assert len(r["itl"]) == r["chunks"] - 1
            assert r["ttft"] + sum(r["itl"]) <= r["latency"] + 1e-6
    else:
        assert res["mean_ttft_ms"] is None and res["mean_tpot_ms"] is None
        assert res["total_chunks"] == 0


def test_vserve_local_tokenizer_and_two_clients(vserve_url: str, tmp_path: Path) -> None:
    from vserve.models.demo import write_demo_tokenizer

    write_demo_tokenizer(tmp_path)
    n = 8
    res = bench("--base-url", vserve_url, "--stream", "--num-prompts", str(n), "--input-len",
                "40", "--output-len", "5", "--tokenizer", str(tmp_path), "--tokenize", "off",
                "--num-clients", "2", "--request-rate", "200", "--max-concurrency", "4")
    assert res["prompt_source"].startswith("random (exact, tokenizer")
    assert res["completed"] == n and res["failed"] == 0, res.get("errors")
    assert res["total_input_tokens"] == n * 40
    assert res["total_output_tokens"] == n * 5
    assert res["config"]["num_clients"] == 2


def test_cli_writes_json(vserve_url: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vserve.cli.main", "bench", "serve", "--base-url", vserve_url,
         "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--stream",
         "--result-json", str(out), "--disable-tqdm"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout
    assert "Median TTFT (ms):" in proc.stdout
    res = json.loads(out.read_text())
    assert res["completed"] == 4 and res["total_output_tokens"] == 16
    assert res["config"]["stream"] is True and res["config"]["model"] == "demo"
    assert set(res["time_series"]) == {"t", "requests_per_s", "output_tokens_per_s"}


def test_key_from_the_environment_and_a_fresh_seed_each_run(tmp_path: Path) -> None:
    """No --api-key: $OPENAI_API_KEY is sent. No --seed: each run draws (and records) its
    own (a second run with the same prompts would hit the prefix cache)."""
    import os

    with serve("demo", "--api-key", "sekret") as srv:
        seeds = []
        for run in range(2):
            out = tmp_path / f"r{run}.json"
            env = {**os.environ, "OPENAI_API_KEY": "sekret"}
            env.pop("VSERVE_API_KEY", None)
            proc = subprocess.run(
                [sys.executable, "-m", "vserve.cli.main", "bench", "serve", "--base-url",
                 srv.base_url, "--num-prompts", "3", "--input-len", "8", "--output-len", "2",
                 "--result-json", str(out), "--disable-tqdm"],
                capture_output=True, text=True, timeout=60, env=env)
            assert proc.returncode == 0, proc.stderr
            res = json.loads(out.read_text())
            assert res["completed"] == 3, res
            seeds.append(res["config"]["seed"])
        assert seeds[0] != seeds[1]


# -- against the stub ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "vserve.bench.stub", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"on (http://\S+)", proc.stdout.readline())
        assert m, "the stub did not start"
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


TTFT, ITL = 0.2, 0.05


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stub_known_delays(stub_url: str, endpoint: str) -> None:
    """TTFT and ITL from a server that sleeps known amounts; a chat stream's first event is
    role-only and arrives at once, so it must not count as the first token."""
    n, out = 4, 5
    res = bench("--base-url", stub_url, "--endpoint-type", endpoint, "--stream",
                "--num-prompts", str(n), "--input-len", "10", "--output-len", str(out),
                "--extra-body", json.dumps({"stub_ttft": TTFT, "stub_itl": ITL}),
                "--save-detailed")
    assert res["completed"] == n and res["failed"] == 0, res.get("errors")
    assert res["total_chunks"] == n * out
    assert res["total_output_tokens"] == n * out
    # Lower bounds are exact (the stub sleeps at least that long; had the role-only event
    # counted, TTFT would be ~0); upper bounds leave room for a busy machine.
    ms = 1e3
    assert TTFT * ms <= res["min_ttft_ms"] and res["median_ttft_ms"] < (TTFT + 0.15) * ms
    assert ITL * ms * 0.9 <= res["min_itl_ms"] and res["median_itl_ms"] < (ITL + 0.05) * ms
    assert ITL * ms * 0.95 <= res["median_tpot_ms"] < (ITL + 0.05) * ms
    e2e = TTFT + (out - 1) * ITL
    assert e2e * ms <= res["min_e2el_ms"] + 1 and res["median_e2el_ms"] < (e2e + 0.3) * ms
    for r in res["requests"]:
        assert len(r["itl"]) == out - 1
    # The stub counts words: with no /tokenize the generator measures tokens per word (1.0).
    assert res["prompt_source"].startswith("random (approximate")
    assert res["total_input_tokens"] == n * 10


def test_stub_non_streaming_many_clients(stub_url: str) -> None:
    n = 60
    res = bench("--base-url", stub_url, "--num-prompts", str(n), "--input-len", "7",
                "--output-len", "3", "--num-clients", "3", "--max-concurrency", "7",
                "--save-detailed")
    assert res["completed"] == n and res["failed"] == 0
    assert res["total_output_tokens"] == 3 * n and res["total_input_tokens"] == 7 * n
    assert res["mean_ttft_ms"] is None and res["mean_itl_ms"] is None
    check_ordered(res, "e2el")
    assert res["request_throughput"] == pytest.approx(n / res["duration"])
    assert sum(res["time_series"]["requests_per_s"]) * res["duration"] / 60 == pytest.approx(n)


def test_stub_request_rate(stub_url: str) -> None:
    n, rate = 10, 40.0
    t = time.perf_counter()
    res = bench("--base-url", stub_url, "--num-prompts", str(n), "--request-rate", str(rate),
                "--input-len", "4", "--output-len", "2", "--save-detailed")
    assert res["completed"] == n
    starts = [r["start"] for r in res["requests"]]
    assert starts == sorted(starts) and starts[0] < 0.05
    # Poisson gaps with mean 25 ms: 9 of them are nowhere near 0 nor a second.
    assert 0.03 < starts[-1] < 1.0
    assert time.perf_counter() - t < 30


def test_jsonl_prompts(stub_url: str, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "one two three", "output_len": 2},
        {"prompt": "four five"},
        {"messages": [{"role": "user", "content": "a b c d"}], "output_len": 4},
    ]) + "\n")
    with pytest.raises(ValueError, match="messages"):
        bench("--base-url", stub_url, "--dataset-path", str(path), "--num-prompts", "3")
    res = bench("--base-url", stub_url, "--endpoint-type", "chat", "--dataset-path", str(path),
                "--num-prompts", "6", "--output-len", "3", "--save-detailed")
    assert res["completed"] == 6
    assert [r["prompt_tokens"] for r in res["requests"]] == [3, 2, 4, 3, 2, 4]
    assert [r["output_tokens"] for r in res["requests"]] == [2, 3, 4, 2, 3, 4]


def test_failures_reported(stub_url: str, tmp_path: Path) -> None:
    res = bench("--base-url", stub_url, "--endpoint", "/nope", "--num-prompts", "5",
                "--tokenize", "off", "--input-len", "4", "--output-len", "2")
    assert res["completed"] == 0 and res["failed"] == 5
    assert "HTTP 404" in next(iter(res["errors"]))
    proc = subprocess.run(
        [sys.executable, "-m", "vserve.cli.main", "bench", "serve", "--base-url", stub_url,
         "--endpoint", "/nope", "--num-prompts", "2", "--num-warmups", "1", "--disable-tqdm"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "every warm-up request failed" in proc.stderr and "404" in proc.stderr


def test_plot(stub_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = tmp_path / "r.png"
    pytest.importorskip("matplotlib")
    bench("--base-url", stub_url, "--stream", "--num-prompts", "8", "--input-len", "4",
          "--output-len", "4", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from vserve.bench.plot import MissingPackage, require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPackage, match="matplotlib.*vserve\\[bench\\]"):
        require_matplotlib()


# -- metric helpers -----------------------------------------------------------------------------

def test_percentile_and_summary() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    rs = [RequestResult(ok=True, start=0.0, latency=1.0, ttft=0.2, itl=[0.1, 0.3],
                        prompt_tokens=10, output_tokens=3, chunks=3, usage_reported=True),
          RequestResult(ok=True, start=1.0, latency=1.0, ttft=0.4, itl=[0.2, 0.2],
                        prompt_tokens=10, output_tokens=3, chunks=3, usage_reported=True),
          RequestResult(ok=False, start=0.5, latency=0.1, status=500, error="boom")]
    s = summarize(rs, 2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"boom": 1})
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0
    assert s["mean_ttft_ms"] == pytest.approx(300)
    assert s["median_itl_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(((1 - 0.2) / 2 + (1 - 0.4) / 2) / 2 * 1e3)
    assert s["p99_e2el_ms"] == pytest.approx(1000)
    ts = time_series(rs, 2.0, bins=2)
    assert ts["requests_per_s"] == [0.0, 2.0]  # both end at t >= 1.0
    assert sum(ts["output_tokens_per_s"]) == pytest.approx(6.0)
