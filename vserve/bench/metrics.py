"""Per-request results and the summary metrics computed from them.

Definitions (all latencies are measured on the client, from just before the request is
written — after waiting for a ``--max-concurrency`` slot — to the arrival of the bytes):

* **TTFT** (streaming only): until the first SSE event that carries generated content (a
  completion's non-empty ``text``, a chat delta's non-empty ``content``/``reasoning_content``/
  ``tool_calls``). A chat stream's leading role-only event does not count.
* **ITL**: the gaps between consecutive content events of one stream, pooled over requests. An
  event may carry more than one token; events that arrive in one read get a gap of 0.
* **TPOT** (streaming only): per request, ``(e2e - ttft) / (output_tokens - 1)`` for requests
  with at least 2 output tokens.
* **E2E latency** (``e2el``): until the response is complete (``[DONE]`` or the end of the body).
* **duration**: from the benchmark's start (the first request's scheduled send time) to the
  last completion; throughputs divide by it. Token counts come from the server's ``usage``
  when it reports it; otherwise from the prompt builder's count and the number of content
  events (flagged by ``usage_reported: false``).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class RequestResult:
    """What the load generator saw of one request (times in seconds)."""

    ok: bool = False
    start: float = 0.0  # since the benchmark's start
    latency: float = 0.0  # end to end
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0  # content events (streaming)
    usage_reported: bool = False
    status: int = 0
    error: str = ""


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in 0..100."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def _pct_name(q: float) -> str:
    return f"p{q:g}".replace(".", "_")


def distribution(values: list[float], percentiles: tuple[float, ...]) -> dict[str, float | None]:
    """mean, median, std, min, max and the percentiles of ``values`` (seconds) in ms."""
    names = ["mean", "median", "std", "min", "max"] + [_pct_name(q) for q in percentiles]
    if not values:
        return {k: None for k in names}
    s = sorted(values)
    out: dict[str, float | None] = {
        "mean": statistics.fmean(s) * 1e3,
        "median": percentile(s, 50) * 1e3,
        "std": (statistics.pstdev(s) if len(s) > 1 else 0.0) * 1e3,
        "min": s[0] * 1e3,
        "max": s[-1] * 1e3,
    }
    for q in percentiles:
        out[_pct_name(q)] = percentile(s, q) * 1e3
    return out


def metric_values(results: list[RequestResult]) -> dict[str, list[float]]:
    """The raw samples (seconds) of each latency metric over the successful requests."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2el = [r.latency for r in ok]
    return {"ttft": ttft, "tpot": tpot, "itl": itl, "e2el": e2el}


def summarize(results: list[RequestResult], duration: float,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """The summary: counts, throughputs, and ``{mean,median,std,min,max,pN}_{metric}_ms``."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    dur = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_chunks": chunks,
        "request_throughput": len(ok) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "chunk_throughput": chunks / dur,
        "usage_reported": bool(ok) and all(r.usage_reported for r in ok),
    }
    for name, values in metric_values(results).items():
        for stat, value in distribution(values, percentiles).items():
            out[f"{stat}_{name}_ms"] = value
    if failed:
        out["errors"] = dict(Counter(r.error or f"HTTP {r.status}" for r in failed)
                             .most_common(10))
    return out


def time_series(results: list[RequestResult], duration: float,
                bins: int = 60) -> dict[str, list[float]]:
    """Completed requests/s and output tokens/s over time, in ``bins`` equal bins.

    Streaming requests spread their output tokens over their content events; non-streaming
    ones count them at completion.
    """
    bins = max(1, bins)
    width = max(duration, 1e-9) / bins
    reqs = [0.0] * bins
    toks = [0.0] * bins

    def slot(t: float) -> int:
        return min(bins - 1, max(0, int(t / width)))

    for r in results:
        if not r.ok:
            continue
        end = r.start + r.latency
        reqs[slot(end)] += 1
        if r.ttft is not None and r.chunks:
            per = r.output_tokens / r.chunks
            t = r.start + r.ttft
            toks[slot(t)] += per
            for gap in r.itl:
                t += gap
                toks[slot(t)] += per
        else:
            toks[slot(end)] += r.output_tokens
    return {"t": [(i + 0.5) * width for i in range(bins)],
            "requests_per_s": [x / width for x in reqs],
            "output_tokens_per_s": [x / width for x in toks]}


def format_summary(summary: dict[str, Any], percentiles: tuple[float, ...]) -> str:
    """A human-readable table of the summary."""
    lines = ["============ Serving Benchmark Result ============"]

    def row(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = "n/a" if value is None else (fmt.format(value) if not isinstance(value, str)
                                            else value)
        lines.append(f"{label:<40}{text:>10}")

    row("Successful requests:", summary["completed"], "{:d}")
    row("Failed requests:", summary["failed"], "{:d}")
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"], "{:d}")
    row("Total generated tokens:", summary["total_output_tokens"], "{:d}")
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Input token throughput (tok/s):", summary["input_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    if summary["total_chunks"]:
        row("Streamed chunks (chunks/s):", summary["chunk_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in METRICS:
        if summary.get(f"mean_{name}_ms") is None:
            continue
        lines.append(f"{'-' * 17}{titles[name]}{'-' * 17}"[:50])
        row(f"Mean {name.upper()} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", summary[f"median_{name}_ms"])
        for q in percentiles:
            if q != 50:
                row(f"P{q:g} {name.upper()} (ms):", summary[f"{_pct_name(q)}_{name}_ms"])
    for err, n in (summary.get("errors") or {}).items():
        lines.append(f"error x{n}: {err}")
    lines.append("=" * 50)
    return "\n".join(lines)
