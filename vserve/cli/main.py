"""The `vserve` command."""

from __future__ import annotations

import argparse
import sys

from vserve import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vserve", description="LLM serving")
    parser.add_argument("--version", action="version", version=f"vserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from vserve.cli.serve import add_serve_args, run_serve

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_serve_args(serve)
    from vserve.bench.cli import add_bench_args, run_bench

    add_bench_args(sub.add_parser("bench", help="benchmark a server (vserve bench serve …)"))
    args = parser.parse_args(argv)
    from vserve.logging_utils import init_logging

    init_logging("vserve", getattr(args, "log_level", "info").upper())
    if args.command == "serve":
        sys.exit(run_serve(args))
    if args.command == "bench":
        sys.exit(run_bench(args))


if __name__ == "__main__":
    main()
