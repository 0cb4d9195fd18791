"""`vserve bench serve`: prepare prompts, warm up, run the load (in one or several client
processes), summarize, write JSON, draw a PNG."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp

from vserve import envs
from vserve.bench import datasets
from vserve.bench.client import LoadConfig, make_session, run_async, run_load, send_request
from vserve.bench.datasets import BenchPrompt
from vserve.bench.metrics import (
    RequestResult,
    format_summary,
    summarize,
    time_series,
)


class BenchError(Exception):
    """A problem to report in one line (bad arguments, server unreachable, warm-up failed)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- talking to the server before the run -----------------------------------------------------

class _Server:
    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.session, self.prefix = make_session(cfg, 64)

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> Any:
        async with self.session.get(self.prefix + path) as r:
            if r.status != 200:
                raise BenchError(f"GET {path}: HTTP {r.status}: {(await r.text())[:200]}")
            return await r.json(content_type=None)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.session.post(self.prefix + path, json=body) as r:
            if r.status != 200:
                raise BenchError(f"POST {path}: HTTP {r.status}: {(await r.text())[:200]}")
            return await r.json(content_type=None)

    async def default_model(self) -> str:
        try:
            models = await self.get("/v1/models")
            return str(models["data"][0]["id"])
        except (aiohttp.ClientError, OSError) as e:
            raise BenchError(f"cannot reach {self.cfg.base_url}: {e}") from None
        except (KeyError, IndexError, TypeError):
            raise BenchError("/v1/models lists no model; pass --model") from None

    async def probe_prompt_tokens(self, text: str) -> int | None:
        """``usage.prompt_tokens`` of a one-token, non-streaming request for ``text``."""
        cfg = self.cfg
        p = BenchPrompt(datasets._as_input(text, cfg.chat), -1, 1)
        probe = LoadConfig(**{**cfg.__dict__, "stream": False})
        from vserve.bench.client import build_body

        r = await send_request(self.session, self.prefix + cfg.endpoint, build_body(probe, p),
                               p, False, time.perf_counter())
        return r.prompt_tokens if r.ok and r.usage_reported else None


async def _prepare(args: argparse.Namespace, cfg: LoadConfig
                   ) -> tuple[LoadConfig, list[BenchPrompt], dict[str, Any]]:
    """Resolve the model, build the prompts, run the warm-ups."""
    srv = _Server(cfg)
    info: dict[str, Any] = {}
    try:
        if not cfg.model:
            cfg.model = await srv.default_model()
            srv.cfg = cfg
        rng = random.Random(args.seed)
        if args.dataset_path:
            prompts = datasets.load_jsonl(args.dataset_path, args.num_prompts, args.output_len,
                                          cfg.chat)
            info["prompt_source"] = f"jsonl:{args.dataset_path}"
        else:
            prompts, how, exact = await _random_prompts(args, cfg, srv, rng)
            info["prompt_source"] = how
            if exact is not None:
                info["prompt_lengths_exact"] = exact
        if args.num_warmups > 0:
            await _warm_up(args, cfg, prompts)
    finally:
        await srv.close()
    return cfg, prompts, info


async def _random_prompts(args: argparse.Namespace, cfg: LoadConfig, srv: _Server,
                          rng: random.Random) -> tuple[list[BenchPrompt], str, bool | None]:
    """Random prompts, how they were made, and whether every one has its asked length
    (None: unknown, approximated with words)."""
    n = args.num_prompts
    in_lens = datasets.target_lengths(n, args.input_len, args.random_range_ratio, rng)
    out_lens = datasets.target_lengths(n, args.output_len, args.random_range_ratio, rng)
    counter: datasets.TokenCounter | None = None
    how = ""
    if args.tokenizer:
        counter = datasets.LocalCounter(args.tokenizer, cfg.chat, args.chat_template)
        how = f"random (exact, tokenizer {args.tokenizer})"
    elif args.tokenize != "off":
        server_counter = datasets.ServerCounter(srv.post, cfg.model, cfg.chat)
        try:
            await server_counter.count("hello")
            await server_counter.decode(await server_counter.encode_plain("hello"))
            counter = server_counter
            how = "random (exact, server /tokenize)"
        except (BenchError, aiohttp.ClientError, OSError, KeyError, TypeError, ValueError) as e:
            if args.tokenize == "on":
                raise BenchError(f"the server's /tokenize does not work: {e}") from None
            _log(f"note: no usable /tokenize ({e}); approximating prompt lengths with words")
    if counter is not None:
        t = time.perf_counter()
        prompts = await datasets.exact_random_prompts(counter, in_lens, out_lens, rng, cfg.chat)
        misses = sum(p.prompt_len != want for p, want in zip(prompts, in_lens))
        note = ""
        if misses:
            floor = await counter.count("")
            note = f" ({misses} not exact; an empty prompt is already {floor} tokens)"
        _log(f"built {n} random prompts in {time.perf_counter() - t:.1f}s{note}")
        return prompts, how, misses == 0
    # Words: measure tokens per word with two probes (usage.prompt_tokens).
    small = await srv.probe_prompt_tokens(datasets.random_words(1, rng))
    big = await srv.probe_prompt_tokens(datasets.random_words(201, rng))
    if small is None or big is None:
        ratio, overhead = 1.3, 0
        _log("note: the server reports no usage for probes; assuming 1.3 tokens a word")
    else:
        ratio = max(0.1, (big - small) / 200)
        overhead = max(0, round(small - ratio))
    prompts = datasets.word_prompts(in_lens, out_lens, rng, cfg.chat, ratio, overhead)
    return prompts, f"random (approximate, {ratio:.2f} tokens/word)", None


async def _warm_up(args: argparse.Namespace, cfg: LoadConfig, prompts: list[BenchPrompt]
                   ) -> None:
    n = args.num_warmups
    warm = [prompts[i % len(prompts)] for i in range(n)]
    wcfg = LoadConfig(**{**cfg.__dict__, "request_rate": math.inf,
                         "max_concurrency": min(cfg.max_concurrency or n, n)})
    results = await run_load(wcfg, warm, None, [0])
    bad = [r for r in results if not r.ok]
    if len(bad) == len(results):
        raise BenchError(f"every warm-up request failed, e.g.: {bad[0].error}")
    if bad:
        _log(f"note: {len(bad)}/{len(results)} warm-up requests failed, e.g.: {bad[0].error}")


# -- the timed run ------------------------------------------------------------------------------

def _split(total: int | None, k: int, i: int) -> int | None:
    if total is None:
        return None
    return total // k + (1 if i < total % k else 0)


def _child(cfg: LoadConfig, prompts: list[BenchPrompt], progress: Any, slot: int,
           start_at: Any, ready: Any, out: Any) -> None:
    async def on_ready() -> float:
        ready.put(slot)
        while start_at.value == 0.0:
            await asyncio.sleep(0.001)
        return float(start_at.value)

    try:
        results = run_async(run_load(cfg, prompts, None, progress, slot, on_ready))
        out.put((slot, [_pack(r) for r in results], None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        out.put((slot, [], f"{type(e).__name__}: {e}"))


def _pack(r: RequestResult) -> tuple[Any, ...]:
    return (r.ok, r.start, r.latency, r.ttft, r.itl, r.prompt_tokens, r.output_tokens,
            r.chunks, r.usage_reported, r.status, r.error)


def _unpack(t: tuple[Any, ...]) -> RequestResult:
    return RequestResult(*t)


def _progress_bar(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, unit="req", dynamic_ncols=True, file=sys.stderr)


def _run_single(cfg: LoadConfig, prompts: list[BenchPrompt], disable_tqdm: bool
                ) -> list[RequestResult]:
    progress = [0]

    async def main() -> list[RequestResult]:
        bar = _progress_bar(len(prompts), disable_tqdm)
        task = asyncio.ensure_future(run_load(cfg, prompts, None, progress))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.25)
                bar.update(progress[0] - bar.n)
        finally:
            bar.close()
        return task.result()

    return run_async(main())


def _run_multi(cfg: LoadConfig, prompts: list[BenchPrompt], k: int, disable_tqdm: bool
               ) -> list[RequestResult]:
    """``k`` client processes, each with 1/k of the prompts, the rate and the concurrency
    (independent Poisson streams of rate r/k add up to one of rate r)."""
    ctx: Any = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    progress = ctx.Array("q", k, lock=False)
    start_at = ctx.Value("d", 0.0, lock=False)
    ready, out = ctx.Queue(), ctx.Queue()
    procs = []
    for i in range(k):
        sub = LoadConfig(**{**cfg.__dict__, "request_rate": cfg.request_rate / k,
                            "max_concurrency": _split(cfg.max_concurrency, k, i),
                            "seed": cfg.seed + i})
        p = ctx.Process(target=_child, args=(sub, prompts[i::k], progress, i, start_at, ready,
                                             out), daemon=True, name=f"bench-client-{i}")
        p.start()
        procs.append(p)
    try:
        for _ in range(k):
            try:
                ready.get(timeout=120)
            except Exception:  # noqa: BLE001 - queue.Empty
                raise BenchError("the client processes did not start") from None
        start_at.value = time.perf_counter() + 0.05
        bar = _progress_bar(len(prompts), disable_tqdm)
        got: dict[int, list[RequestResult]] = {}
        try:
            while len(got) < k:
                try:
                    slot, packed, err = out.get(timeout=0.25)
                except Exception:  # noqa: BLE001 - queue.Empty
                    if not any(p.is_alive() for p in procs) and out.empty():
                        raise BenchError("a client process died") from None
                else:
                    if err:
                        raise BenchError(f"client process {slot} failed: {err}")
                    got[slot] = [_unpack(t) for t in packed]
                bar.update(sum(progress) - bar.n)
        finally:
            bar.close()
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    # Back in the original order (prompt j went to client j % k).
    merged: list[RequestResult] = [RequestResult()] * len(prompts)
    for i in range(k):
        merged[i::k] = got[i]
    return merged


# -- entry point --------------------------------------------------------------------------------

def parse_extra_body(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BenchError("--extra-body must be a JSON object")
    return value


def load_config(args: argparse.Namespace) -> LoadConfig:
    chat = args.endpoint_type == "chat"
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    headers = dict(h.split(":", 1) for h in args.header or [])
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    api_key = args.api_key or envs.client_api_key()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    extra = parse_extra_body(args.extra_body)
    if args.ignore_eos:
        extra.setdefault("ignore_eos", True)
    if args.request_rate <= 0:
        raise BenchError("--request-rate must be positive (or inf)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be at least 1")
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    if args.num_clients < 1:
        raise BenchError("--num-clients must be at least 1")
    base = args.base_url
    if not base.startswith(("http://", "https://", "unix:")):
        base = "http://" + base
    return LoadConfig(
        base_url=base, endpoint=endpoint, chat=chat, model=args.model or "",
        stream=args.stream, include_usage=args.include_usage, extra_body=extra,
        headers=headers, request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, timeout=args.timeout, seed=args.seed)


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = _log,
                  around_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark ``args`` describe; returns the result (also written/plotted as
    asked). ``around_run("start")`` and ``around_run("end")`` are called just before and
    after the timed run (after prompts and warm-ups), e.g. to sample CPU times."""
    cfg = load_config(args)
    if args.plot:  # fail before the run, not after it
        from vserve.bench.plot import require_matplotlib

        require_matplotlib()
    cfg, prompts, info = run_async(_prepare(args, cfg))
    k = min(args.num_clients, len(prompts))
    log(f"benchmarking {cfg.base_url}{cfg.endpoint} (model {cfg.model}, "
        f"{'streaming' if cfg.stream else 'non-streaming'}): {len(prompts)} requests, "
        f"rate {cfg.request_rate:g}/s, max concurrency {cfg.max_concurrency or 'none'}, "
        f"{k} client process{'es' if k > 1 else ''}")
    if around_run is not None:
        around_run("start")
    cpu0 = os.times()
    if k <= 1:
        results = _run_single(cfg, prompts, args.disable_tqdm)
    else:
        results = _run_multi(cfg, prompts, k, args.disable_tqdm)
    cpu1 = os.times()
    if around_run is not None:
        around_run("end")
    duration = max((r.start + r.latency for r in results), default=0.0)
    percentiles = tuple(float(q) for q in args.metric_percentiles.split(","))
    summary = summarize(results, duration, percentiles)
    client_cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system
                  + cpu1.children_user - cpu0.children_user
                  + cpu1.children_system - cpu0.children_system)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **summary,
        "client_cpu_seconds": client_cpu,
        **info,
        "config": {**{k: v for k, v in cfg.__dict__.items() if k != "headers"},
                   "request_rate": None if math.isinf(cfg.request_rate) else cfg.request_rate,
                   "num_prompts": len(prompts), "num_clients": k,
                   "num_warmups": args.num_warmups, "input_len": args.input_len,
                   "output_len": args.output_len, "random_range_ratio": args.random_range_ratio,
                   "dataset_path": args.dataset_path, "label": args.label},
        "time_series": time_series(results, duration),
    }
    if args.save_detailed:
        result["requests"] = [
            {"ok": r.ok, "start": r.start, "latency": r.latency, "ttft": r.ttft, "itl": r.itl,
             "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "chunks": r.chunks, "status": r.status, "error": r.error} for r in results]
    if not args.quiet:
        print(format_summary(summary, percentiles), flush=True)
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        log(f"results written to {args.result_json}")
    if args.plot:
        from vserve.bench.plot import plot_results

        plot_results(results, result, args.plot)
        log(f"plot written to {args.plot}")
    return result
