"""Front-end capacity: how many requests/s the API-server processes sustain, and how it scales.

For each N in ``--api-server-counts`` (default 1, 2, 4, … up to the cores available) this
starts ``vserve serve demo --benchmark-skip-compute --api-server-count N`` (engines emit fake
tokens without any arithmetic, so the HTTP front end is what is measured), then drives it
with ``vserve bench serve`` (in this process; ``--num-clients`` processes) for

* ``non-stream``: completions, 32 prompt tokens, 16 output tokens (``ignore_eos``);
* ``stream``: the same with ``"stream": true`` and usage in the last event;

and reports requests/s, streamed chunks/s, CPU per request by role (the API servers, the
engine(s), the supervisor with its coordinator thread, and the load generator; psutil CPU
times over the timed run only), each role's CPU use (cores busy), the API servers'
CPU-bound capacity (completed requests per CPU-second of API-server time: what one API server
would sustain with a core to itself), resident memory per API server, and scaling against
N = 1.

``--target stub`` instead measures the load generator alone against
``python -m vserve.bench.stub`` (a raw-asyncio canned server): how many requests/s one client
process can drive.

On a small machine the load generator, the engine and the API servers share the cores, so
the absolute requests/s understate a bigger host; the CPU-per-request figures do not depend on
that. See benchmarks/README.md for recorded figures.

    python benchmarks/frontend_capacity.py                       # N = 1, 2, … ≤ cores
    python benchmarks/frontend_capacity.py --api-server-counts 1,2,4 --num-clients 2
    python benchmarks/frontend_capacity.py --target stub --num-clients 1
    python benchmarks/frontend_capacity.py --api-server-counts 1 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vserve.bench.cli import add_bench_serve_args  # noqa: E402
from vserve.bench.runner import run_benchmark  # noqa: E402
from vserve.roles import process_role  # noqa: E402

_SERVING = re.compile(r"vserve is serving .* on (http://\S+)")
_STUB = re.compile(r"stub serving on (http://\S+)")
MODES = {"non-stream": [], "stream": ["--stream"]}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_counts() -> list[int]:
    out, n = [], 1
    while n <= cores():
        out.append(n)
        n *= 2
    return out


class Launched:
    """A child process whose log is scanned for the URL it serves on."""

    def __init__(self, argv: list[str], pattern: re.Pattern[str], timeout: float = 180) -> None:
        self.log = Path(tempfile.mkstemp(prefix="vserve-capacity-", suffix=".log")[1])
        self._f = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv} exited:\n{self.log.read_text()}")
            time.sleep(0.1)
        else:
            self.stop()
            raise TimeoutError(f"{argv} did not start:\n{self.log.read_text()}")

    def roles(self) -> dict[int, str]:
        """pid → api / engine / supervisor (/ stub)."""
        out = {self.proc.pid: "supervisor"}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                found = process_role(p.cmdline())
            except psutil.Error:
                continue
            out[p.pid] = "other" if found is None else {"api_server": "api"}.get(found[0],
                                                                                 found[0])
        return out

    def stop(self) -> None:
        kids = []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in kids:
            try:
                p.kill()
            except psutil.Error:
                pass
        self._f.close()
        self.log.unlink(missing_ok=True)  # its text was shown if it mattered (start errors)


def cpu_seconds(pids: dict[int, str]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            out[pid] = 0.0
    return out


_TOKENIZER_DIR: list[str] = []


def demo_tokenizer() -> list[str]:
    """Prompts are built with a local copy of the demo tokenizer (exact lengths, and no
    /tokenize traffic to warm the servers before the timed run)."""
    if not _TOKENIZER_DIR:
        from vserve.models.demo import write_demo_tokenizer

        d = tempfile.mkdtemp(prefix="vserve-capacity-tok-")
        atexit.register(shutil.rmtree, d, True)
        write_demo_tokenizer(Path(d))
        _TOKENIZER_DIR.append(d)
    return ["--tokenizer", _TOKENIZER_DIR[0], "--tokenize", "off"]


def bench_args(url: str, mode: str, a: argparse.Namespace, n: int,
               stub: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_serve_args(p)
    conc = a.max_concurrency or 64 * n
    return p.parse_args([*(["--tokenize", "off"] if stub else demo_tokenizer()),
        "--base-url", url, "--endpoint-type", "completions", "--num-prompts",
        str(a.num_prompts * (n if a.scale_prompts else 1)), "--input-len", str(a.input_len),
        "--output-len", str(a.output_len), "--max-concurrency", str(conc),
        "--num-warmups", str(min(200, conc * 2)), "--num-clients", str(a.num_clients),
        "--disable-tqdm", "--quiet", *MODES[mode]])


def start_profilers(where: Path, pids: dict[int, str], seconds: float) -> list[subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("note: py-spy is not installed (pip install py-spy); not profiling",
              file=sys.stderr)
        return []
    where.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid, role in pids.items():
        if role not in ("api", "engine"):
            continue
        # Collapsed stacks ("raw"): top_functions() reads them; flamegraph.pl or
        # speedscope draw them. --nonblocking: the process is never paused.
        procs.append(subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate",
             "200", "--format", "raw", "-o", str(where / f"{role}-{pid}.txt"),
             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def top_functions(raw: Path, top: int = 25) -> list[tuple[str, float, float]]:
    """(function, self share, inclusive share) from py-spy's collapsed-stack output."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return []
    ranked = sorted(self_n.items(), key=lambda kv: -kv[1])[:top]
    return [(f, c / total, incl_n[f] / total) for f, c in ranked]


_MODULES = (("uvicorn/", "uvicorn"), ("starlette/", "starlette"), ("fastapi/", "fastapi"),
            ("pydantic", "pydantic"), ("zmq/", "pyzmq"), ("prometheus_client", "prometheus_client"),
            ("vserve/frontend/tokenizer", "vserve.frontend.tokenizer"),
            ("vserve/frontend/detokenizer", "vserve.frontend.detokenizer"),
            ("vserve/api/", "vserve.api"), ("vserve/frontend/", "vserve.frontend"),
            ("vserve/metrics/", "vserve.metrics"), ("vserve/", "vserve (other)"),
            ("asyncio/", "asyncio"), ("threading.py", "threading"), ("enum.py", "enum"),
            ("uuid.py", "uuid"), ("json/", "json"), ("msgspec", "msgspec"))


def self_by_module(raw: Path) -> list[tuple[str, float]]:
    """Share of samples whose innermost frame is in each package."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        name = next((n for key, n in _MODULES if key in leaf), "other")
        counts[name] = counts.get(name, 0) + int(count)
        total += int(count)
    return sorted(((k, v / total) for k, v in counts.items()), key=lambda kv: -kv[1])


def run_server(n: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    srv = Launched([sys.executable, "-m", "vserve.cli.main", "serve", "demo",
                    "--benchmark-skip-compute", "--api-server-count", str(n), "--port", "0",
                    "--data-parallel-size", str(a.data_parallel_size),
                    "--log-stats-interval", "0", "--max-num-seqs", "1024"], _SERVING)
    rows = []
    try:
        time.sleep(1.0)
        roles = srv.roles()
        for mode in a.modes.split(","):
            args = bench_args(srv.url, mode, a, n)
            samples: dict[str, dict[int, float]] = {}
            profilers: list[subprocess.Popen] = []

            def around(phase: str, roles: dict[int, str] = roles, mode: str = mode,
                       samples: dict[str, dict[int, float]] = samples,
                       profilers: list[subprocess.Popen] = profilers) -> None:
                samples[phase] = cpu_seconds(roles)
                if phase == "start" and a.profile:
                    profilers.extend(start_profilers(Path(a.profile) / f"n{n}-{mode}", roles,
                                                     a.profile_seconds))

            res = run_benchmark(args, log=lambda m: None, around_run=around)
            for p in profilers:
                p.wait()
            by_role: dict[str, float] = {}
            for pid, role in roles.items():
                by_role[role] = by_role.get(role, 0.0) + samples["end"][pid] - samples["start"][pid]
            by_role["client"] = res["client_cpu_seconds"]
            done = max(res["completed"], 1)
            dur = res["duration"]
            api_pids = [pid for pid, r in roles.items() if r == "api"]
            rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in api_pids]
            row = {
                "api_servers": n, "engines": a.data_parallel_size, "mode": mode,
                "num_clients": a.num_clients,
                "concurrency": args.max_concurrency, "completed": res["completed"],
                "failed": res["failed"], "duration_s": dur,
                "req_per_s": res["request_throughput"], "chunks_per_s": res["chunk_throughput"],
                "output_tok_per_s": res["output_throughput"],
                "median_e2el_ms": res["median_e2el_ms"], "p99_e2el_ms": res["p99_e2el_ms"],
                "median_ttft_ms": res["median_ttft_ms"],
                "input_tokens_ok": res["total_input_tokens"] == res["completed"] * a.input_len,
                "output_tokens_ok": res["total_output_tokens"] == res["completed"] * a.output_len,
                "cpu_ms_per_req": {r: 1e3 * s / done for r, s in by_role.items()},
                "cores_busy": {r: s / dur for r, s in by_role.items()},
                "api_req_per_cpu_s": done / max(by_role.get("api", 0.0), 1e-9),
                "api_rss_mib": rss,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.profile:
                for raw in sorted((Path(a.profile) / f"n{n}-{mode}").glob("*.txt")):
                    print(f"--- top functions (self, inclusive) of {raw.name}")
                    for fn, s, inc in top_functions(raw):
                        print(f"{100 * s:5.1f}% {100 * inc:5.1f}%  {fn}")
                    print(f"--- self time by package of {raw.name}")
                    print(", ".join(f"{name} {100 * s:.1f}%" for name, s in self_by_module(raw)))
    finally:
        srv.stop()
    return rows


def run_stub(a: argparse.Namespace) -> list[dict[str, Any]]:
    stub = Launched([sys.executable, "-m", "vserve.bench.stub", "--port", "0"], _STUB)
    rows = []
    try:
        roles = {stub.proc.pid: "stub"}
        for mode in a.modes.split(","):
            args = bench_args(stub.url, mode, a, 1, stub=True)
            samples: dict[str, dict[int, float]] = {}

            def around(phase: str, samples: dict[str, dict[int, float]] = samples) -> None:
                samples[phase] = cpu_seconds(roles)

            res = run_benchmark(args, log=lambda m: None, around_run=around)
            stub_cpu = sum(samples["end"][p] - samples["start"][p] for p in roles)
            done = max(res["completed"], 1)
            row = {"target": "stub", "mode": mode, "num_clients": a.num_clients,
                   "concurrency": args.max_concurrency, "completed": res["completed"],
                   "failed": res["failed"], "duration_s": res["duration"],
                   "req_per_s": res["request_throughput"],
                   "chunks_per_s": res["chunk_throughput"],
                   "client_cpu_ms_per_req": 1e3 * res["client_cpu_seconds"] / done,
                   "client_req_per_cpu_s": done / max(res["client_cpu_seconds"], 1e-9),
                   "client_cores_busy": res["client_cpu_seconds"] / res["duration"],
                   "stub_cores_busy": stub_cpu / res["duration"],
                   "stub_cpu_ms_per_req": 1e3 * stub_cpu / done}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stub.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| N | mode | clients | req/s | chunks/s | API CPU ms/req | engine | supervisor "
            "| client | cores busy (api/engine/client) | API req per CPU-s | RSS/API server MiB "
            "| scaling vs N=1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["mode"]: r["req_per_s"] for r in rows if r.get("api_servers") == 1}
    for r in rows:
        c, b = r["cpu_ms_per_req"], r["cores_busy"]
        scale = ""
        if r["mode"] in base and r["api_servers"] > 1:
            scale = f"{r['req_per_s'] / (r['api_servers'] * base[r['mode']]):.0%} of linear"
        lines.append(
            f"| {r['api_servers']} | {r['mode']} | {r['num_clients']} | {r['req_per_s']:.0f} "
            f"| {r['chunks_per_s']:.0f} | {c.get('api', 0):.2f} | {c.get('engine', 0):.2f} "
            f"| {c.get('supervisor', 0):.2f} | {c.get('client', 0):.2f} "
            f"| {b.get('api', 0):.2f}/{b.get('engine', 0):.2f}/{b.get('client', 0):.2f} "
            f"| {r['api_req_per_cpu_s']:.0f} | {', '.join(f'{x:.0f}' for x in r['api_rss_mib'])} "
            f"| {scale} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["vserve", "stub"], default="vserve")
    p.add_argument("--api-server-counts", default=",".join(map(str, default_counts())))
    p.add_argument("--modes", default="non-stream,stream")
    p.add_argument("--num-prompts", type=int, default=5000, help="per run (× N with "
                   "--scale-prompts)")
    p.add_argument("--scale-prompts", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=None, help="default 64 × N")
    p.add_argument("--num-clients", type=int, default=1, help="load-generator processes")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="engines (one engine's scheduler loop caps the rate at large N)")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="py-spy record the API servers and engines during each run")
    p.add_argument("--profile-seconds", type=float, default=10.0,
                   help="keep it shorter than a run (raise --num-prompts)")
    a = p.parse_args()
    print(f"machine: {cores()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"python {sys.version.split()[0]}", flush=True)
    if a.target == "stub":
        rows = run_stub(a)
    else:
        rows = []
        for n in (int(x) for x in a.api_server_counts.split(",")):
            rows += run_server(n, a)
        print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
