"""A burst past the queue bound: `--max-num-queued-reqs` is exact across API servers.

Before the admission ledger each API server checked the bound against the coordinator's
snapshot, up to 100 ms old: 64 simultaneous requests to 4 servers admitted 14 for a bound
of 8 (4 running + 4 waiting).
"""

from __future__ import annotations

import asyncio
import time

import httpx
from helpers.serve import serve

SEQS, BOUND, SERVERS, BURST = 4, 4, 4, 64


async def _burst(base: str, size: int) -> tuple[list[int], list[float], list[str]]:
    """``size`` streams at once; each admitted one is held open until every answer is in,
    so none finishes and frees its place during the burst. (statuses, seconds to each
    refusal, Retry-After of each refusal)."""
    all_answered = asyncio.Event()
    statuses: list[int] = []
    refusal_times: list[float] = []
    retry_after: list[str] = []
    body = {"prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one() -> None:
            start = time.monotonic()
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={"Connection": "close"}) as r:
                statuses.append(r.status_code)
                if r.status_code == 503:
                    refusal_times.append(time.monotonic() - start)
                    retry_after.append(r.headers.get("retry-after", ""))
                if len(statuses) == size:
                    all_answered.set()
                await all_answered.wait()  # closing the stream aborts the request

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(size))), 120)
    return statuses, refusal_times, retry_after


def _ledger_drained(base: str) -> bool:
    """Every admitted request was released: the server admits a full burst's worth again."""
    r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   timeout=30)
    return r.status_code == 200


def test_burst_admits_at_most_running_plus_bound() -> None:
    with serve("demo", "--api-server-count", str(SERVERS), "--max-num-seqs", str(SEQS),
               "--max-num-queued-reqs", str(BOUND)) as srv:
        for _ in range(2):  # the second burst shows the first one's places were released
            statuses, refusal_times, retry_after = asyncio.run(_burst(srv.base_url, BURST))
            admitted = statuses.count(200)
            assert set(statuses) <= {200, 503}, statuses
            assert 1 <= admitted <= SEQS + BOUND, statuses
            assert statuses.count(503) == BURST - admitted
            assert set(retry_after) == {"1"}
            # Refused without waiting on an engine (generous for a loaded 2-core machine).
            assert max(refusal_times) < 10, refusal_times
            deadline = time.monotonic() + 15
            while not _ledger_drained(srv.base_url):
                assert time.monotonic() < deadline, "admitted requests were never released"
                time.sleep(0.2)
