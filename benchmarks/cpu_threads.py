"""CPU engines under a competing load: the engine's own thread sizing against torch's default.

Two workloads, each timed quiet and with ``--load`` busy processes running (pure Python
spin loops, one per CPU by default: another tenant of the machine), and each with
``--cpu-threads`` left to vserve (``auto``) and set to every core the machine has
(``all``: what torch did before engines sized their threads):

* ``offline``: the README's snippet, ``LLM("demo")`` generating ``--prompts`` × 32 tokens;
* ``serve``: ``vserve serve demo --api-server-count 2``, ``--requests`` streamed
  completions of 32 tokens, one after another.

    python benchmarks/cpu_threads.py --rounds 2

Prints seconds per workload and configuration (median of the rounds) and the loaded/quiet
ratio; the design goal is at most 1.5x with ``auto``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


class Load:
    def __init__(self, n: int) -> None:
        self.stop = mp.Event()
        self.procs = [mp.Process(target=_spin, args=(self.stop,), daemon=True)
                      for _ in range(n)]

    def __enter__(self) -> Load:
        for p in self.procs:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)


OFFLINE = """
import sys, time
from vserve import LLM, SamplingParams
threads = sys.argv[1]
kw = {} if threads == "auto" else {"cpu_threads": int(threads)}
llm = LLM("demo", **kw)
prompts = [f"Hello, my name is {i}" for i in range(int(sys.argv[2]))]
t0 = time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
print("ELAPSED", time.perf_counter() - t0)
"""


def offline(threads: str, prompts: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", OFFLINE, threads, str(prompts)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("ELAPSED"):
            return float(line.split()[1])
    raise RuntimeError(out.stderr[-3000:])


def serve_stream(threads: str, requests: int) -> float:
    from helpers.serve import serve, stream_completion

    args = ["demo", "--api-server-count", "2"]
    if threads != "auto":
        args += ["--cpu-threads", threads]
    env = {"OMP_NUM_THREADS": ""}
    with serve(*args, env=env, timeout=300) as srv:
        stream_completion(srv.base_url, 8)  # warm-up
        t0 = time.perf_counter()
        for _ in range(requests):
            stream_completion(srv.base_url, 32)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--load", type=int, default=os.cpu_count() or 2,
                   help="busy processes competing for the CPUs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    all_cores = str(os.cpu_count() or 1)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_processes": args.load}
    for name, run, size in (("offline", offline, args.prompts),
                            ("serve", serve_stream, args.requests)):
        for threads in ("auto", all_cores):
            label = "auto" if threads == "auto" else f"all ({threads})"
            quiet, loaded = [], []
            for _ in range(args.rounds):
                quiet.append(run(threads, size))
                with Load(args.load):
                    loaded.append(run(threads, size))
            q, lo = statistics.median(quiet), statistics.median(loaded)
            results[f"{name} {label}"] = {"quiet_s": quiet, "loaded_s": loaded,
                                          "ratio": lo / q}
            print(f"{name:8s} threads {label:8s} quiet {q:7.2f} s  loaded {lo:7.2f} s  "
                  f"loaded/quiet {lo / q:5.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
