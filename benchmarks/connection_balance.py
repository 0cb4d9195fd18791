"""How bursts of kept-alive connections spread over the API servers of one listening socket.

Starts ``vserve serve demo --api-server-count N --benchmark-skip-compute``, then, for each
burst size, opens that many TCP connections at once (non-blocking connects), asks on each
which API server holds it (``/health`` answers with ``x-vserve-api-server``), keeps them all
open until every one has answered, closes them, waits until the servers have seen the
closes, and repeats. What a pooling load balancer does when it (re)opens its upstream pool.

    python benchmarks/connection_balance.py --api-server-count 8 --bursts 64,256 --repeat 3

Prints, per burst: connections per server, and min / max as a multiple of the fair share
(the design goal: every server between 0.5 and 1.5 times its share). ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from vserve.launch.connections import ConnectionTable

_SERVING = re.compile(r"vserve is serving .* on http://([\d.]+):(\d+)")


def open_burst(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks.append(s)
    for s in socks:
        s.setblocking(True)
        s.settimeout(30)
    return socks


def server_of(sock: socket.socket) -> str:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    for line in data.split(b"\r\n\r\n", 1)[0].decode().lower().split("\r\n"):
        if line.startswith("x-vserve-api-server:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_dir_of(pid: int) -> str:
    """The server's run directory, from an API server's command line."""
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "--args-file" in cmd:
            return os.path.dirname(cmd[cmd.index("--args-file") + 1])
    raise RuntimeError("no API server found")


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api-server-count", type=int, default=8)
    p.add_argument("--bursts", default="64,256", help="connections per burst, a list")
    p.add_argument("--repeat", type=int, default=3, help="bursts of each size")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    n = args.api_server_count
    log = Path(tempfile.mkstemp(prefix="vserve-balance-", suffix=".log")[1])
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vserve.cli.main", "serve", "demo", "--port", "0",
             "--api-server-count", str(n), "--benchmark-skip-compute"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    results: dict[str, Any] = {"api_server_count": n, "cpus": os.cpu_count(), "bursts": []}
    try:
        m = None

        def serving() -> bool:
            nonlocal m
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            m = _SERVING.search(log.read_text(errors="replace"))
            return m is not None

        wait_until(serving, 300, "vserve serve did not start")
        assert m is not None
        host, port = m.group(1), int(m.group(2))
        table = ConnectionTable(os.path.join(run_dir_of(proc.pid), "connections"), n)
        wait_until(lambda: None not in table.live_counts(), 60, "not every server accepts")
        for size in (int(b) for b in args.bursts.split(",") if b):
            for i in range(args.repeat):
                t0 = time.perf_counter()
                socks = open_burst(host, port, size)
                with ThreadPoolExecutor(32) as pool:
                    owners = Counter(pool.map(server_of, socks))
                elapsed = time.perf_counter() - t0
                counts = [owners.get(str(k), 0) for k in range(n)]
                fair = size / n
                row = {"connections": size, "burst": i + 1, "per_server": counts,
                       "min_share": min(counts) / fair, "max_share": max(counts) / fair,
                       "other": {k: v for k, v in owners.items() if not k.isdigit()},
                       "seconds_to_all_answered": round(elapsed, 3)}
                results["bursts"].append(row)
                print(f"{size:4d} connections, burst {i + 1}: {counts}  share "
                      f"{row['min_share']:.2f}..{row['max_share']:.2f} of fair  "
                      f"({elapsed * 1e3:.0f} ms to all answered)", flush=True)
                for s in socks:
                    s.close()
                wait_until(lambda: sum(c or 0 for c in table.live_counts()) == 0, 30,
                           "the servers did not see the closes")
        table.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.unlink(missing_ok=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
