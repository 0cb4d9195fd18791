"""The PNG of a benchmark run (matplotlib, the optional ``bench`` extra)."""

from __future__ import annotations

from typing import Any

from vserve.bench.metrics import RequestResult, metric_values

_MISSING = ("drawing a PNG (--plot) needs the 'matplotlib' package, which is not installed: "
            "pip install 'vserve[bench]' (or pip install matplotlib)")


class MissingPackage(RuntimeError):
    pass


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingPackage(_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: list[RequestResult], result: dict[str, Any], path: str) -> None:
    """Latency distributions (TTFT, ITL, TPOT, end to end) and throughput over time."""
    plt = require_matplotlib()
    values = metric_values(results)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    titles = {"ttft": "Time to first token", "itl": "Inter-token latency",
              "tpot": "Time per output token", "e2el": "End-to-end latency"}
    for ax, name in zip(axes.flat, ("ttft", "itl", "tpot", "e2el")):
        ms = [v * 1e3 for v in values[name]]
        ax.set_title(titles[name])
        ax.set_xlabel("ms")
        if not ms:
            ax.text(0.5, 0.5, "n/a (non-streaming)" if name != "e2el" else "no data",
                    ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(ms, bins=50, color="tab:blue", alpha=0.8)
        ax.set_ylabel("count")
        for key, style in (("median", "--"), ("p99", ":")):
            v = result.get(f"{key}_{name}_ms")
            if v is not None:
                ax.axvline(v, color="tab:red", linestyle=style, label=f"{key} {v:.1f} ms")
        ax.legend(fontsize=8)
    ts = result["time_series"]
    ax = axes.flat[4]
    ax.plot(ts["t"], ts["requests_per_s"], color="tab:green")
    ax.set_title("Completed requests/s over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("req/s")
    ax = axes.flat[5]
    ax.plot(ts["t"], ts["output_tokens_per_s"], color="tab:orange")
    ax.set_title("Output tokens/s over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("tok/s")
    cfg = result.get("config", {})
    fig.suptitle(f"{cfg.get('base_url', '')}{cfg.get('endpoint', '')} "
                 f"{'stream' if cfg.get('stream') else 'non-stream'} — "
                 f"{result['completed']} ok, {result['failed']} failed, "
                 f"{result['request_throughput']:.1f} req/s, "
                 f"{result['output_throughput']:.1f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
