"""Soak: many requests through one server, and how much each process's memory grew.

Starts ``vserve serve demo`` (``--api-server-count`` servers, a KV cache of
``--num-kv-blocks``), sends ``--warmup`` requests (allocators, caches and lazy imports
settle, and every KV block has been used once: on CPU the cache is allocated untouched and
grows into RSS as blocks are first used, up to its size), records the resident memory of every API
server and engine, sends ``--requests`` more (a mix: non-streaming, streaming, n=2, a
client that disconnects mid-stream, a refused over-long prompt), and records it again.
Prints one JSON object: requests/s and, per process, RSS before and after and the growth
in KiB per 1,000 requests. ``tests/faults/test_soak.py`` runs it with a bound.

    python benchmarks/soak.py --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.serve import ServeProcess, serve  # noqa: E402


def _processes(srv: ServeProcess) -> dict[str, psutil.Process]:
    return {f"{role}_{index}": psutil.Process(pid)
            for role in ("api_server", "engine") for index, pid in srv.pids(role).items()}


def _rss(procs: dict[str, psutil.Process]) -> dict[str, int]:
    return {name: p.memory_info().rss for name, p in procs.items()}


async def _one(client: httpx.AsyncClient, i: int) -> int:
    kind = i % 10
    if kind in (0, 1, 2, 3, 4):
        r = await client.post("/v1/completions", json={"prompt": f"soak {i}",
                                                       "max_tokens": 4})
        return r.status_code
    if kind in (5, 6):
        async with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"soak {i}"}], "max_tokens": 4,
                "stream": True}) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code
    if kind == 7:
        r = await client.post("/v1/completions", json={"prompt": f"soak {i}",
                                                       "max_tokens": 3, "n": 2})
        return r.status_code
    if kind == 8:  # gone mid-stream: the server must abort and forget it
        async with client.stream("POST", "/v1/completions", json={
                "prompt": f"soak {i}", "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as r:
            async for _ in r.aiter_lines():
                break
            return r.status_code
    r = await client.post("/v1/completions", json={"prompt": "x " * 5000, "max_tokens": 4})
    return 200 if r.status_code == 400 else r.status_code  # refused, as it must be


async def _drive(base: str, count: int, concurrency: int, start: int) -> list[int]:
    # Idle connections expire on the client before the server's 5 s keep-alive closes
    # them, so that a request is never sent on a connection the server is closing.
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> int:
            async with sem:
                return await _one(client, i)

        return list(await asyncio.gather(*(guarded(start + i) for i in range(count))))


def run(requests: int, warmup: int, api_servers: int, concurrency: int,
        num_kv_blocks: int) -> dict[str, Any]:
    with serve("demo", "--api-server-count", str(api_servers), "--max-model-len", "1024",
               "--num-kv-blocks", str(num_kv_blocks), "--uvicorn-log-level", "error") as srv:
        procs = _processes(srv)
        statuses = asyncio.run(_drive(srv.base_url, warmup, concurrency, 0))
        before = _rss(procs)
        start = time.monotonic()
        trace: list[dict[str, int]] = []  # RSS (KiB) after each fifth of the requests
        step = max(1, requests // 5)
        for done in range(0, requests, step):
            statuses += asyncio.run(_drive(srv.base_url, min(step, requests - done),
                                           concurrency, warmup + done))
            trace.append({k: v >> 10 for k, v in _rss(procs).items()})
        took = time.monotonic() - start
        time.sleep(1.0)  # let in-flight aborts finish
        after = _rss(procs)
        assert set(_processes(srv)) == set(procs), "a process was replaced mid-soak"
    bad = [s for s in statuses if s != 200]
    return {
        "requests": requests, "warmup": warmup, "api_servers": api_servers,
        "concurrency": concurrency, "failed": len(bad), "seconds": round(took, 1),
        "requests_per_s": round(requests / took, 1),
        "rss_kib": {name: {"before": before[name] >> 10, "after": after[name] >> 10,
                           "growth_kib_per_1k_requests": round(
                               (after[name] - before[name]) / 1024 / (requests / 1000), 1)}
                    for name in procs},
        "rss_kib_trace": trace,
        "machine": f"{os.cpu_count()} cores",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--api-server-count", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=1024,
                    help="small enough that the warmup cycles through every block: on CPU the "
                         "KV cache is allocated untouched, and each block's first use adds "
                         "its pages to the engine's RSS, which would read as a leak")
    args = ap.parse_args()
    print(json.dumps(run(args.requests, args.warmup, args.api_server_count,
                         args.concurrency, args.num_kv_blocks), indent=2))


if __name__ == "__main__":
    main()
