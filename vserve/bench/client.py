"""The load generator's hot path: one event loop (uvloop) and one aiohttp session per process.

Speed matters here, since the generator must not be what limits a benchmark: request bodies
are encoded before the clock starts, connections are reused (keep-alive; the pool is sized to
the concurrency bound), responses and SSE events are decoded by msgspec into structs that
name only the fields read, and progress is a counter that a separate task shows.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableSequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import msgspec

from vserve.bench.datasets import BenchPrompt
from vserve.bench.metrics import RequestResult

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh uvloop loop (asyncio's when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    uvloop.install()  # pragma: no cover - Python 3.10
    return asyncio.run(coro)


@dataclass
class LoadConfig:
    """Everything a client process needs (picklable)."""

    base_url: str  # http://host:port, https://…, or unix:/path/to.sock
    endpoint: str  # /v1/completions or /v1/chat/completions
    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    timeout: float = 600.0
    seed: int = 0


def raise_fd_limit() -> None:
    """Unbounded concurrency opens a connection per request: lift the soft fd limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - best effort
        pass


def make_session(cfg: LoadConfig, limit: int | None) -> tuple[aiohttp.ClientSession, str]:
    """A session with connection reuse, and the URL prefix to use with it."""
    # Idle connections are closed after 4 s, before uvicorn's 5 s keep-alive timeout, so a
    # reused connection is never one the server is closing at that moment.
    common: dict[str, Any] = {"limit": limit or 0, "keepalive_timeout": 4.0}
    if cfg.base_url.startswith("unix:"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
            path=cfg.base_url[len("unix:"):], **common)
        prefix = "http://localhost"
    else:
        connector = aiohttp.TCPConnector(ttl_dns_cache=None, **common)
        prefix = cfg.base_url.rstrip("/")
    headers = {"Content-Type": "application/json", **cfg.headers}
    session = aiohttp.ClientSession(
        connector=connector, headers=headers, auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=cfg.timeout))
    return session, prefix


def build_body(cfg: LoadConfig, p: BenchPrompt) -> bytes:
    body: dict[str, Any] = {"model": cfg.model}
    if cfg.chat:
        body["messages"] = p.prompt
    else:
        body["prompt"] = p.prompt
    body["max_tokens"] = p.output_len
    if cfg.stream:
        body["stream"] = True
        if cfg.include_usage:
            body["stream_options"] = {"include_usage": True}
    body.update(cfg.extra_body)
    return msgspec.json.encode(body)


# Only the fields the generator reads; msgspec skips the rest without building objects.
class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct, gc=False):
    text: str | None = None
    delta: _Delta | None = None


class _Body(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode = msgspec.json.Decoder(_Body).decode


def _has_content(body: _Body) -> bool:
    for c in body.choices or ():
        if c.text:
            return True
        d = c.delta
        if d is not None and (d.content or d.reasoning_content or d.tool_calls):
            return True
    return False


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)[:200]
    return str(err)[:200]


async def send_request(session: aiohttp.ClientSession, url: str, body: bytes, p: BenchPrompt,
                       stream: bool, t0: float) -> RequestResult:
    """Send one request and time it (``t0``: the benchmark's start on perf_counter)."""
    r = RequestResult(prompt_tokens=max(p.prompt_len, 0))
    clock = time.perf_counter
    st = clock()
    r.start = st - t0
    try:
        async with session.post(url, data=body) as resp:
            r.status = resp.status
            if resp.status != 200:
                text = (await resp.read())[:300].decode(errors="replace")
                r.error = f"HTTP {resp.status}: {text}"
            elif not stream:
                data = await resp.read()
                try:
                    parsed = _decode(data)
                except msgspec.DecodeError as e:
                    r.error = f"bad JSON response: {e}"
                else:
                    if parsed.error is not None:
                        r.error = _error_text(parsed.error)
                    else:
                        r.ok = True
                        if parsed.usage is not None:
                            r.usage_reported = True
                            r.prompt_tokens = parsed.usage.prompt_tokens
                            r.output_tokens = parsed.usage.completion_tokens
                        else:
                            r.output_tokens = p.output_len
            else:
                await _read_stream(resp, r, st, p)
    except asyncio.TimeoutError:
        r.ok, r.error = False, "timeout"
    except (aiohttp.ClientError, OSError) as e:
        r.ok, r.error = False, f"{type(e).__name__}: {e}"[:300]
    r.latency = clock() - st
    return r


async def _read_stream(resp: aiohttp.ClientResponse, r: RequestResult, st: float,
                       p: BenchPrompt) -> None:
    clock = time.perf_counter
    buf = b""
    last = 0.0
    done = False
    failed = ""
    usage: _Usage | None = None
    itl = r.itl
    chunks = 0
    async for piece in resp.content.iter_any():
        now = clock()
        buf = buf + piece if buf else piece
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # comments, event:, id:
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                try:
                    obj = _decode(payload)
                except msgspec.DecodeError as e:
                    failed = failed or f"bad SSE event: {e}"
                    continue
                if obj.error is not None:
                    failed = failed or _error_text(obj.error)
                if obj.usage is not None:
                    usage = obj.usage
                if _has_content(obj):
                    if chunks == 0:
                        r.ttft = now - st
                    else:
                        itl.append(now - last)
                    last = now
                    chunks += 1
    r.chunks = chunks
    if failed:
        r.error = failed
        return
    if not done:
        r.error = "stream ended without [DONE]"
        return
    r.ok = True
    if usage is not None:
        r.usage_reported = True
        r.prompt_tokens = usage.prompt_tokens
        r.output_tokens = usage.completion_tokens
    else:
        r.output_tokens = chunks


async def run_load(cfg: LoadConfig, prompts: list[BenchPrompt], t0: float | None,
                   progress: MutableSequence[int], slot: int = 0,
                   on_ready: Callable[[], Awaitable[float]] | None = None
                   ) -> list[RequestResult]:
    """Send ``prompts`` at ``cfg.request_rate`` within ``cfg.max_concurrency``.

    The clock starts at ``t0`` (perf_counter), or when ``on_ready`` (called once the bodies
    are encoded and the session made) returns it, or now. ``progress[slot]`` counts finished
    requests.
    """
    bodies = [build_body(cfg, p) for p in prompts]
    n = len(prompts)
    conc = cfg.max_concurrency
    if not conc:
        raise_fd_limit()
    session, prefix = make_session(cfg, conc)
    url = prefix + cfg.endpoint
    stream = cfg.stream
    results: list[RequestResult | None] = [None] * n
    async with session:
        if on_ready is not None:
            t0 = await on_ready()
        if t0 is None:
            t0 = time.perf_counter()
        delay = t0 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

        async def go(i: int) -> None:
            results[i] = await send_request(session, url, bodies[i], prompts[i], stream, t0)
            progress[slot] += 1

        if math.isinf(cfg.request_rate):
            if conc:
                it = iter(range(n))

                async def worker() -> None:
                    for i in it:
                        await go(i)

                await asyncio.gather(*(worker() for _ in range(min(conc, n))))
            else:
                await asyncio.gather(*(go(i) for i in range(n)))
        else:
            await _paced(cfg, n, go, t0)
    return [r if r is not None else RequestResult(error="not sent") for r in results]


async def _paced(cfg: LoadConfig, n: int, go: Callable[[int], Awaitable[None]],
                 t0: float) -> None:
    """Arrivals with gamma-distributed gaps of mean 1/rate (burstiness 1: Poisson)."""
    rng = random.Random(cfg.seed)
    shape = cfg.burstiness
    scale = 1.0 / (cfg.request_rate * shape)
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def gated(i: int) -> None:
        if gate is None:
            await go(i)
        else:
            async with gate:
                await go(i)

    tasks = []
    due = t0
    for i in range(n):
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(gated(i)))
        due += rng.gammavariate(shape, scale)
    await asyncio.gather(*tasks)
