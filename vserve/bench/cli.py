"""`vserve bench serve` arguments."""

from __future__ import annotations

import argparse
import math


def _rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity", "max"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (a number or 'inf')") from None


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server",
        formatter_class=_DefaultsFormatter,
        description="Load-test an OpenAI-compatible server (vserve or another) and report "
                    "throughput and TTFT/TPOT/ITL/end-to-end latency percentiles.")
    add_bench_serve_args(s)


def add_bench_serve_args(s: argparse.ArgumentParser) -> None:
    t = s.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server: http(s)://host:port or unix:/path/to.sock")
    t.add_argument("--endpoint-type", choices=["completions", "chat"], default="completions",
                   help="which OpenAI API to call")
    t.add_argument("--endpoint", default=None,
                   help="path (default /v1/completions or /v1/chat/completions)")
    t.add_argument("--model", default=None, help="default: the first of /v1/models")
    t.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                   help="stream the responses (TTFT, TPOT and ITL need it)")
    t.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="streaming: ask for stream_options.include_usage (token counts)")
    t.add_argument("--extra-body", default="{}",
                   help="JSON merged into every request body, e.g. '{\"temperature\": 0}'")
    t.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos (vLLM/vserve) so outputs have the asked length; "
                        "--no-ignore-eos for servers that reject it")
    t.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $VSERVE_API_KEY, else "
                        "$OPENAI_API_KEY)")
    t.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="an extra HTTP header (repeat for more)")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    d = s.add_argument_group("prompts")
    d.add_argument("--num-prompts", type=int, default=1000, help="requests in the timed run")
    d.add_argument("--input-len", type=int, default=128,
                   help="random prompts: prompt tokens (as counted in usage.prompt_tokens)")
    d.add_argument("--output-len", type=int, default=128,
                   help="max_tokens (random prompts, and JSONL lines without output_len)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths uniform in len·[1-r, 1+r]")
    d.add_argument("--dataset-path", default=None,
                   help="JSONL: {\"prompt\": str} or {\"messages\": [...]}, optional "
                        "output_len")
    d.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory for exact random prompt lengths")
    d.add_argument("--chat-template", default=None, help="with --tokenizer, for chat")
    d.add_argument("--tokenize", choices=["auto", "on", "off"], default="auto",
                   help="use the server's /tokenize and /detokenize for exact random prompt "
                        "lengths (auto: when they work)")
    d.add_argument("--seed", type=int, default=None,
                   help="seed of the random prompts and of per-request sampling seeds "
                        "(default: a fresh one each run, recorded in the result's config, so "
                        "that a second run does not hit the prefix cache with the same "
                        "prompts; pass it to replay a run)")
    ld = s.add_argument_group("load")
    ld.add_argument("--request-rate", type=_rate, default=math.inf,
                    help="requests/s (Poisson arrivals), or inf: all at once")
    ld.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the arrival gaps (1: Poisson; <1 burstier)")
    ld.add_argument("--max-concurrency", type=int, default=None,
                    help="requests in flight at most (default: no limit)")
    ld.add_argument("--num-warmups", type=int, default=0,
                    help="requests sent (and checked) before the timed run")
    ld.add_argument("--num-clients", type=int, default=1,
                    help="client processes sharing the load (each its own event loop)")
    o = s.add_argument_group("output")
    o.add_argument("--result-json", default=None, help="write the results here")
    o.add_argument("--save-detailed", action="store_true",
                   help="include every request's timings in the JSON")
    o.add_argument("--plot", default=None, metavar="PNG",
                   help="draw latency distributions and throughput over time (matplotlib)")
    o.add_argument("--metric-percentiles", default="50,90,99",
                   help="percentiles reported for every latency")
    o.add_argument("--label", default=None, help="a name for this run in the JSON and plot")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    o.add_argument("--quiet", action="store_true", help="no summary table on stdout")


def run_bench(args: argparse.Namespace) -> int:
    from vserve.bench.plot import MissingPackage
    from vserve.bench.runner import BenchError, run_benchmark

    if args.bench_command != "serve":  # pragma: no cover - argparse enforces it
        return 2
    try:
        result = run_benchmark(args)
    except (BenchError, MissingPackage, ValueError, OSError) as e:
        import sys

        print(f"vserve bench: error: {e}", file=sys.stderr)
        return 2
    return 0 if result["completed"] > 0 else 1
