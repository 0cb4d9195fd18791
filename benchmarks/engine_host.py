"""Engine host cost: where an engine step's CPU time goes, per phase, at a given batch size.

Drives ``EngineCore`` in this process the way the engine process does — each request decoded
from its wire frame and added, ``step()`` called in a loop, each step's outputs encoded to
their frames — under steady churn: ``--batch`` requests are kept in flight, every one with a
``--prompt-len``-token prompt of its own (no prefix-cache hits) and ``--output-len`` output
tokens (``ignore_eos``; ``--stagger``: 0.5x to 1.5x that, so that they do not all end on
the same step), and a finished request is replaced by a new one before the next step, as
under production traffic.

Phases (wall time on this thread, summed over the run, reported per step and per request):

* ``receive``   decode a request frame and ``EngineCore.add_request``
* ``schedule``  ``Scheduler.schedule`` / ``schedule_chained``
* ``execute``   ``ModelRunner.execute_model_async``: input preparation and launch (with
                ``--fake-compute``, the fake tokens)
* ``read_back`` ``PendingOutput.sample`` and ``.result``: waiting for the device, sampling
                on the host where the step needs it, and reading tokens back
* ``update``    ``Scheduler.update_from_output`` and the step's output structs
* ``prepare``   ``PendingOutput.prepare``: a deferred step's sampling inputs staged, its
                grammar bitmasks' fill started (in the background; ``read_back`` waits
                for it)
* ``serialize`` encoding each step's outputs to frames

    python benchmarks/engine_host.py --fake-compute --batch 1,64,256     # CPU, no model work
    python benchmarks/engine_host.py --batch 1,64,256 --model-dir DIR    # GPU, a real model
    python benchmarks/engine_host.py --fake-compute --step-ms 1.5 --async-scheduling \
        --rows constrained --batch 64     # does the host keep a 1.5 ms-per-step device busy?
    python benchmarks/engine_host.py --device cuda --async-scheduling --rows constrained \
        --batch 64,256 --output-len 64 --num-requests 1280   # the same on a GPU, 1B shape

With ``--profile`` a cProfile of the busiest batch size is printed as well.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402,E501
from vserve.engine.core import EngineCore  # noqa: E402
from vserve.launch.lifetime import freeze_startup_heap  # noqa: E402
from vserve.protocol import encode  # noqa: E402
from vserve.protocol.requests import AddRequests, EngineCoreRequest, EngineInput  # noqa: E402
from vserve.protocol.sampling import SamplingParams  # noqa: E402
from vserve.structured.grammar import json_schema  # noqa: E402
from vserve.worker.pending import PendingOutput  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from structured_overhead import LONG_TEXT, synthetic_tokenizer  # noqa: E402

PHASES = ("receive", "schedule", "execute", "read_back", "update", "prepare", "serialize")


class Timers:
    """Wall time per phase; a phase timed inside another (``prepare`` within ``update``)
    counts only as itself."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(PHASES, 0.0)
        self._inner = 0.0  # time of the timed calls nested in the one running

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        total = self.total

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer, self._inner = self._inner, 0.0
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                total[phase] += dt - self._inner
                self._inner = outer + dt

        return timed


def benchmark_model_dir(a: argparse.Namespace) -> Path:
    """``--model-dir``, else the demo model — or, for ``--rows constrained``, the
    Llama-3.2-1B shape with a synthetic 128k-id tokenizer, since a mask's cost grows with
    the vocabulary: its config alone under ``--fake-compute``, else a checkpoint of random
    weights (as ``structured_overhead.py`` writes; for a GPU)."""
    from vserve.models.source import resolve_model_dir

    if a.model_dir:
        return Path(a.model_dir)
    if a.rows != "constrained":
        return resolve_model_dir("demo")
    from gpu_serving import LLAMA_3_2_1B, SHAPES, make_model

    directory = Path(tempfile.mkdtemp(prefix="vserve-host-"))
    if a.fake_compute:
        cfg = dict(LLAMA_3_2_1B, eos_token_id=LLAMA_3_2_1B["vocab_size"] - 1)
        (directory / "config.json").write_text(json.dumps(cfg))
    else:
        directory = make_model(directory / "llama1b", SHAPES["1b"])
    synthetic_tokenizer(directory, LLAMA_3_2_1B["vocab_size"])
    return directory


def make_core(a: argparse.Namespace, batch: int, directory: Path) -> EngineCore:
    longest = (3 * a.output_len + 1) // 2 if a.stagger else a.output_len
    max_len = a.prompt_len + longest + 16
    config = EngineConfig(
        model=ModelConfig(model=str(directory), max_model_len=max_len),
        cache=CacheConfig(num_kv_blocks=batch * (-(-max_len // 16) + 1) + 64,
                          enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=max(batch, 1),
                                  max_num_batched_tokens=max(2048, batch * a.prompt_len),
                                  async_scheduling=a.async_scheduling),
        device=DeviceConfig(device=a.device, benchmark_skip_compute=a.fake_compute,
                            benchmark_step_ms=a.step_ms),
    )
    return EngineCore(config, directory)


def run(a: argparse.Namespace, batch: int, profile: bool, directory: Path) -> dict[str, Any]:
    core = make_core(a, batch, directory)
    freeze_startup_heap()  # as the engine process does once it is ready
    timers = Timers()
    sched, runner = core.scheduler, core.runner
    sched.schedule = timers.wrap("schedule", sched.schedule)  # type: ignore[method-assign]
    sched.schedule_chained = timers.wrap(  # type: ignore[method-assign]
        "schedule", sched.schedule_chained)
    sched.update_from_output = timers.wrap(  # type: ignore[method-assign]
        "update", sched.update_from_output)
    runner.execute_model_async = timers.wrap(  # type: ignore[method-assign]
        "execute", runner.execute_model_async)
    original_result = PendingOutput.result
    PendingOutput.result = timers.wrap("read_back", original_result)  # type: ignore[method-assign]
    # A deferred step (host sampling: always on CUDA) waits for its logits in sample(), which
    # step() calls before result(); result()'s own call is then a no-op.
    original_sample = PendingOutput.sample
    PendingOutput.sample = timers.wrap("read_back", original_sample)  # type: ignore[method-assign]
    original_prepare = PendingOutput.prepare
    PendingOutput.prepare = timers.wrap("prepare", original_prepare)  # type: ignore[method-assign]
    decoder = msgspec.msgpack.Decoder(EngineInput)
    rng = random.Random(0)
    vocab = min(core.vocab_size, 256)
    eos = [core.vocab_size + 1]  # never sampled
    # Free text inside a JSON string, as structured_overhead.py measures on the GPU.
    structured = json_schema(LONG_TEXT) if a.rows == "constrained" else None
    if structured is not None:
        eos = [core.vocab_size - 1]  # the grammar's own EOS (ends a completed document)

    def output_len(i: int) -> int:
        if not a.stagger:
            return int(a.output_len)
        # 0.5x to 1.5x, spread evenly over each batch's worth of requests.
        return max(1, round(a.output_len * (0.5 + (i * 37 % batch) / max(batch, 1))))

    def params(i: int) -> SamplingParams:
        if a.rows == "greedy":
            return SamplingParams(temperature=0.0, max_tokens=output_len(i), ignore_eos=True)
        return SamplingParams(temperature=1.0, seed=i, max_tokens=output_len(i),
                              ignore_eos=True, structured=structured)

    frames = [encode(AddRequests([EngineCoreRequest(
        f"r{i}", [rng.randrange(1, vocab) for _ in range(a.prompt_len)], params(i), eos,
        0.0)])) for i in range(a.num_requests + batch)]
    next_frame = 0
    in_flight = 0
    done = 0
    steps = 0
    tokens = 0
    warm = min(a.num_requests // 5, 200)
    t0 = c0 = 0.0
    profiler = cProfile.Profile() if profile else None

    def receive(frame: bytes) -> None:
        msg = decoder.decode(frame)
        assert isinstance(msg, AddRequests)
        for req in msg.requests:
            err = core.add_request(req)
            assert err is None, err

    timed_receive = timers.wrap("receive", receive)
    timed_encode = timers.wrap("serialize", lambda outs: [encode(o) for o in outs.values()])
    while done < a.num_requests:
        while in_flight < batch and next_frame < len(frames):
            timed_receive(frames[next_frame])
            next_frame += 1
            in_flight += 1
        outs = core.step()
        timed_encode(outs)
        steps += 1
        for o in outs.values():
            tokens += len(o.token_ids)
            for _ in o.finished:
                in_flight -= 1
                done += 1
                if done == warm:  # measure from here: everything compiled and warm
                    for k in timers.total:
                        timers.total[k] = 0.0
                    t0, c0 = time.perf_counter(), time.process_time()
                    steps = tokens = 0
                    if profiler is not None:
                        profiler.enable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        profiler.disable()
    PendingOutput.result = original_result  # type: ignore[method-assign]
    PendingOutput.sample = original_sample  # type: ignore[method-assign]
    PendingOutput.prepare = original_prepare  # type: ignore[method-assign]
    measured = a.num_requests - warm
    res: dict[str, Any] = {
        "batch": batch, "requests": measured, "steps": steps, "tokens": tokens,
        "wall_s": wall, "cpu_ms_per_request": 1e3 * cpu / measured,
        "requests_per_s": measured / wall, "tokens_per_s": tokens / wall,
        "us_per_step": {k: 1e6 * v / steps for k, v in timers.total.items()},
        "us_per_request": {k: 1e6 * v / measured for k, v in timers.total.items()},
    }
    res["us_per_step"]["total"] = 1e6 * wall / steps
    # With a simulated device: the share of the run it was busy (1.0: the host kept up).
    res["device_busy"] = steps * a.step_ms / 1e3 / wall if a.step_ms else None
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,64,256", help="requests kept in flight (a list)")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--fake-compute", action="store_true",
                   help="engines skip the model (benchmark_skip_compute)")
    p.add_argument("--rows", default="greedy", choices=["greedy", "sampled", "constrained"],
                   help="every request greedy, sampled (temperature 1, seeded), or sampled "
                        "under a JSON schema ({\"text\": string})")
    p.add_argument("--stagger", action="store_true",
                   help="output lengths from 0.5x to 1.5x --output-len, so that the requests "
                        "in flight do not all end on the same step")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="with --fake-compute: each step holds a simulated device this long "
                        "(a GPU's step time); reports how busy the host kept it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model-dir", default=None, help="default: the demo model")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the largest batch")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    directory = benchmark_model_dir(a)
    rows = [run(a, b, a.profile and b == max(batches), directory) for b in batches]
    print(f"{'batch':>5} {'req/s':>8} {'tok/s':>9} {'cpu ms/req':>10}  "
          + " ".join(f"{k:>9}" for k in (*PHASES, "total")) + "   (us per step)")
    for r in rows:
        print(f"{r['batch']:>5} {r['requests_per_s']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['cpu_ms_per_request']:>10.3f}  "
              + " ".join(f"{r['us_per_step'][k]:>9.1f}" for k in (*PHASES, "total"))
              + (f"   device busy {r['device_busy']:.1%}" if r["device_busy"] else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
