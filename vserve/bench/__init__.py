"""`vserve bench`: benchmarking tools for any OpenAI-compatible server.

* ``vserve bench serve`` (cli.py → runner.py): a load generator — random prompts of exact token
  lengths or prompts from a JSONL file, Poisson or unbounded arrivals, a concurrency bound,
  one or several client processes — reporting throughput and TTFT/TPOT/ITL/end-to-end
  latency percentiles as JSON, and optionally as a PNG (``pip install 'vserve[bench]'``).
* ``python -m vserve.bench.stub``: a canned OpenAI-compatible server (raw asyncio + httptools)
  to measure the load generator itself and to test the metrics against known delays.

See docs/design/benchmarks.md.
"""
