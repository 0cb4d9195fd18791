"""GPU end-to-end benchmark: a Llama-3.2-1B- or 3.1-8B-shaped model on one GPU, bf16 or FP8.

In one run, on the same random weights (written to local disk with safetensors; nothing is
downloaded):

1. the card's copy bandwidth: a 1 GiB device-to-device copy, bytes read + written over the
   median time (the ceiling for a memory-bound decode step);
2. the engine in this process (``EngineCore``, no HTTP): single-request decode tokens/s
   (128-token prompt, ``--decode-tokens`` greedy tokens), the GPU time of one decode step
   (the CUDA graph replayed alone, events), and achieved GB/s = bytes a step must read
   (weights + the KV cache of the context) / step time, next to the copy bandwidth, as
   gpt-fast reports; host overhead per step = engine step time - GPU step time;
   a torch.profiler table of decode steps at batch 1 and 256 (``--profile``);
3. ``vserve serve`` over HTTP (``vserve bench serve``, streaming, ``ignore_eos``): output
   tokens/s at concurrency 1, 16, 64 and 256 with 128 prompt / 128 output tokens, TTFT and
   TPOT; the TTFT at concurrency 1 is that of a 128-token prompt on an idle server. With
   ``--offline`` (or when the server cannot start) the sweep goes through ``vserve.LLM``
   instead (engine process + ZMQ, no HTTP), and the report says so;
4. HF transformers ``generate`` on the same weights (bf16, SDPA): 1 request and a batch of
   ``--hf-batch`` (128 prompt / 128 output tokens);
5. with ``--gpt-fast PATH/model.py``: gpt-fast, the peer, decoding the same shape in bf16 at
   batch 1 and 64 in the same run (``benchmarks/gpt_fast_peer.py``), next to the engine's
   single request and its 64-request decode.

``--shape 8b`` (Llama-3.1-8B: 32 layers, hidden 4096) and ``--quantization fp8`` (weights
quantized as they load) change the model; the engine part then also reports prefill of
8 x 2,048-token prompts in TFLOP/s next to the card's measured bf16 matmul peak.

    python benchmarks/gpu_serving.py --out /tmp/gpu-bench              # everything
    python benchmarks/gpu_serving.py --out /tmp/gpu-bench --skip-hf --profile
    python benchmarks/gpu_serving.py --shape 8b --quantization fp8 --skip-http --skip-hf \
        --gpt-fast ../shared/peers/gpt-fast/model.py

Results: ``OUT/summary.json`` and a table on stdout (docs/design/gpu.md records them).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
LLAMA_3_1_8B = {
    **LLAMA_3_2_1B,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "head_dim": 128,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
}
SHAPES = {"1b": LLAMA_3_2_1B, "8b": LLAMA_3_1_8B}
VOCAB = LLAMA_3_2_1B["vocab_size"]  # both shapes


def step_bytes(cfg: dict[str, Any], quantization: str | None) -> int:
    """Bytes of weights one decode step reads: every linear layer (1 byte per weight in FP8,
    plus a float32 scale per output row), the norms and the LM head (16-bit), not the
    embedding table (one row of it)."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["num_hidden_layers"]
    rows = (nh + 2 * nkv) * hd + h + 2 * i + h  # qkv, o, gate/up, down: output rows
    weights = h * (nh + 2 * nkv) * hd + nh * hd * h + 2 * h * i + i * h
    linear = layers * (weights + 4 * rows if quantization == "fp8" else 2 * weights)
    return linear + layers * 2 * h * 2 + h * 2 + cfg["vocab_size"] * h * 2


def matmul_peak_tflops() -> float:
    """The card's bf16 dense matmul rate, measured: 8192^3 GEMMs, median of 20."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. the card -------------------------------------------------------------------------
def copy_bandwidth(gib: float = 1.0, reps: int = 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of ``reps``)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    bw = 2 * src.numel() * src.element_size() / times[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return bw


# ---- the model ---------------------------------------------------------------------------
def make_model(directory: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """Write a checkpoint of ``shape`` (random bf16 weights, the demo tokenizer)."""
    from safetensors.torch import save_file

    from vserve.models.demo import BOS_TOKEN_ID, EOS_TOKEN_ID, EOT_TOKEN_ID, write_demo_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(shape, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std
        return t.to(torch.bfloat16).cpu()

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=g, device="cuda")).to(torch.bfloat16).cpu()

    tensors = {"model.embed_tokens.weight": rand(v, h, std=1.0), "model.norm.weight": norm(h)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(nh * hd, h),
            p + "self_attn.k_proj.weight": rand(nkv * hd, h),
            p + "self_attn.v_proj.weight": rand(nkv * hd, h),
            p + "self_attn.o_proj.weight": rand(h, nh * hd),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": [EOS_TOKEN_ID, EOT_TOKEN_ID]}))
    write_demo_tokenizer(directory)
    return directory


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids above the demo tokenizer's 300 are fine for the engine (they decode to "").
    return torch.randint(400, vocab, (n, length), generator=g).tolist()


# ---- 2. the engine in this process ---------------------------------------------------------
QUANTIZATION: str | None = None  # --quantization, for every engine of this process
KV_CACHE_DTYPE = "auto"  # --kv-cache-dtype, likewise


def _engine(model_dir: Path, max_num_seqs: int, enforce_eager: bool = False,
            mixed_step_graphs: bool = True) -> Any:
    from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
    from vserve.engine.core import EngineCore

    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=4096,
                          quantization=QUANTIZATION),  # type: ignore[arg-type]
        cache=CacheConfig(gpu_memory_utilization=0.9,
                          kv_cache_dtype=KV_CACHE_DTYPE),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
        device=DeviceConfig(device="cuda", enforce_eager=enforce_eager,
                            mixed_step_graphs=mixed_step_graphs),
    )
    return EngineCore(config, model_dir)


def _prefill_ms(core: Any, vocab: int) -> list[float]:
    """The prefill step of a 128-token prompt on an idle engine (its TTFT, less HTTP)."""
    prefill = []
    for i in range(5):
        _add(core, random_prompts(1, 128, vocab, 100 + i), 1)
        torch.cuda.synchronize()
        a = time.perf_counter()
        while core.has_unfinished_requests():
            core.step()
        prefill.append((time.perf_counter() - a) * 1e3)
    return prefill


def _churn(core: Any, vocab: int, n: int = 256, total: int = 1024,
           profile_to: Path | None = None) -> dict[str, float]:
    """Steady churn, in process: ``n`` in flight, each finished request replaced at once by
    a new one, output lengths spread over 64..192 (mean 128) so that requests arrive and
    finish at every step, as behind an HTTP front end. Output tokens/s, and per step: wall
    time and the tokens it computed. ``profile_to``: a torch.profiler table of 40 steps in
    the middle of the run (whose own figures then include the profiler's time)."""
    rng = random.Random(5)
    started, done, produced, steps = 0, 0, 0, 0
    mixed = core.runner.mixed_graphs
    mixed_ms: list[float] = []
    other_ms: list[float] = []
    prof: Any = None
    t0 = time.perf_counter()
    while True:
        while started < total and started - done < n:
            _add(core, random_prompts(1, 128, vocab, 1000 + started), rng.randrange(64, 193))
            started += 1
        if not core.has_unfinished_requests():
            break
        if profile_to is not None and steps == 200:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        replays = mixed.replays if mixed is not None else 0
        a = time.perf_counter()
        for outs in core.step().values():
            produced += len(outs.token_ids)
            done += len(outs.finished)
        dt = (time.perf_counter() - a) * 1e3
        (mixed_ms if mixed is not None and mixed.replays > replays else other_ms).append(dt)
        steps += 1
        if prof is not None and steps == 240:
            torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            assert profile_to is not None
            kav = prof.key_averages()
            profile_to.write_text(
                "40 steps under steady churn (256 in flight)\n\n== by GPU time ==\n"
                + kav.table(sort_by="self_cuda_time_total", row_limit=30)
                + "\n\n== by CPU time ==\n"
                + kav.table(sort_by="self_cpu_time_total", row_limit=30))
            prof = None
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0

    def stats(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {"n": 0}
        q = np.percentile(xs, [50, 90, 99])
        return {"n": len(xs), "mean": float(np.mean(xs)), "p50": float(q[0]),
                "p90": float(q[1]), "p99": float(q[2]), "max": float(max(xs)),
                "first5": [round(x, 2) for x in xs[:5]]}

    return {"output_tokens_per_s": produced / wall, "steps": steps,
            "step_ms_mean": wall / steps * 1e3, "output_tokens_per_step": produced / steps,
            "mixed_graph_step_ms": stats(mixed_ms), "other_step_ms": stats(other_ms)}


def _prefill_tflops(core: Any, cfg: dict[str, Any], peak: float | None, n: int = 8,
                    length: int = 2048) -> dict[str, float]:
    """Prefill of ``n`` prompts of ``length`` tokens (one output token each), in TFLOP/s:
    2 FLOPs per weight of the linear layers per token, plus causal attention (QK^T and PV
    over half the square), next to the measured bf16 matmul peak. Best of 3 rounds."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["num_hidden_layers"]
    linear = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * i
    flops = n * (2 * layers * linear * length + 2 * layers * nh * hd * length * length
                 + 2 * h * cfg["vocab_size"])
    best = math.inf
    for r in range(3):
        _add(core, random_prompts(n, length, VOCAB, 500 + r), 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while core.has_unfinished_requests():
            core.step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    out = {"seconds": best, "tflops": flops / best / 1e12}
    if peak:
        out["fraction_of_peak"] = out["tflops"] / peak
    return out


def _batch_decode(core: Any, n: int, tokens: int) -> float:
    """Decode tokens/s of ``n`` requests decoding together (128-token prompts, prefill
    excluded: timed from the first step after every prompt is in)."""
    _add(core, random_prompts(n, 128, VOCAB, 77), tokens)
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in core.scheduler.requests.values()):
        core.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    produced = 0
    while core.has_unfinished_requests():
        for outs in core.step().values():
            produced += len(outs.token_ids)
    torch.cuda.synchronize()
    return produced / (time.perf_counter() - t0)


def _add(core: Any, prompts: list[list[int]], max_tokens: int) -> None:
    from vserve.protocol.requests import EngineCoreRequest
    from vserve.protocol.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        rid = f"b{time.perf_counter_ns()}-{len(p)}-{id(p)}"
        core.add_request(EngineCoreRequest(rid, p, params, [], time.time()))


def engine_decode(model_dir: Path, weight_bytes: int, copy_bw: float, args: argparse.Namespace,
                  out: Path) -> dict[str, Any]:
    import numpy as np

    cfg = SHAPES[args.shape]
    core = _engine(model_dir, 256)
    runner = core.runner
    res: dict[str, Any] = {"num_kv_blocks": core.num_kv_blocks - 1,
                           "max_concurrency_at_4096": core.max_concurrency}
    vocab = VOCAB
    # Warm-up (prefill kernels for these shapes, eager sizes).
    for n in (2, 1):
        _add(core, random_prompts(n, 128, vocab, n), 8)
        while core.has_unfinished_requests():
            core.step()
    res["engine_prefill_128_ms_all"] = prefill = _prefill_ms(core, vocab)
    oracle = out / "part_hf_oracle.json"
    if oracle.exists() and "prompts" in json.loads(oracle.read_text()):
        res["hf_oracle"] = compare_with_oracle(core, json.loads(oracle.read_text()))
    res["prefill_8x2048"] = _prefill_tflops(core, cfg, args.peak_tflops)
    res["engine_batch64_decode_tokens_per_s"] = _batch_decode(core, 64, args.decode_tokens)

    # Single request: TTFT of the prefill step, then per-token decode steps; with async
    # scheduling (the default on CUDA) and without it, side by side on the same engine.
    for mode in ("async", "sync"):
        core.async_scheduling = mode == "async"
        _add(core, random_prompts(1, 128, vocab, 2), args.decode_tokens)
        torch.cuda.synchronize()
        core.step()  # the prefill step (samples the first token)
        t1 = time.perf_counter()
        steps = []
        decoded = 0
        while core.has_unfinished_requests():
            a = time.perf_counter()
            for outs in core.step().values():
                decoded += len(outs.token_ids)
            steps.append(time.perf_counter() - a)
        t2 = time.perf_counter()
        suffix = "" if mode == "async" else "_sync"
        res[f"engine_decode_tokens_per_s{suffix}"] = decoded / (t2 - t1)
        res[f"engine_step_ms_median{suffix}"] = float(np.median(steps)) * 1e3
    core.async_scheduling = True
    res["engine_prefill_128_ms"] = float(np.median(prefill))

    # GPU time of one decode step alone: the batch-1 graph replayed, events around it.
    graphs = runner.graphs
    assert graphs is not None
    # Every row attends over ``ctx`` tokens in blocks of its own (distinct blocks, so the
    # KV reads come from memory, not L2); the new token's K/V go to the null block.
    ctx = 128 + args.decode_tokens // 2
    kv_elem = torch.tensor([], dtype=runner.kv_dtype).element_size()
    nb = -(-ctx // runner.block_size)
    graphs.reset_inputs()
    reps = 200
    for bs in (1, 16, 64, 256):
        if bs not in graphs.graphs or bs * nb >= core.num_kv_blocks:
            continue
        graphs.small[3, :bs] = ctx
        graphs.width.fill_(nb)
        graphs.table[: bs * nb] = torch.arange(1, bs * nb + 1, dtype=torch.int32,
                                               device="cuda")
        graphs.replay(bs)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graphs.replay(bs)
        b.record()
        b.synchronize()
        step = a.elapsed_time(b) / 1e3 / reps
        kv_bytes = bs * ctx * runner.arch.kv_cache_bytes_per_token(kv_elem)
        res[f"graph_step_ms_bs{bs}"] = step * 1e3
        res[f"graph_gbps_bs{bs}"] = (weight_bytes + kv_bytes) / step / 1e9
        res[f"graph_tokens_per_s_bs{bs}"] = bs / step
    graphs.reset_inputs()
    step1 = res["graph_step_ms_bs1"] / 1e3
    res["bandwidth_bound_tokens_per_s"] = copy_bw / (weight_bytes + ctx * runner.arch
                                                     .kv_cache_bytes_per_token(kv_elem))
    res["achieved_gbps_engine"] = (weight_bytes + ctx * runner.arch
                                   .kv_cache_bytes_per_token(kv_elem)) \
        * res["engine_decode_tokens_per_s"] / 1e9
    res["host_overhead_ms_per_step"] = res["engine_step_ms_median"] - step1 * 1e3
    res["host_overhead_ms_per_step_sync"] = res["engine_step_ms_median_sync"] - step1 * 1e3
    if args.quick:
        from vserve.ops.linear import choices

        res["gemv_choices"] = choices()
        return res

    # Host-side breakdown of one synchronous decode step, no profiler: schedule /
    # prepare+upload / graph launch (CPU time of the call) / execute incl. waiting for the
    # GPU / update. With async scheduling all of it but the wait overlaps the GPU's work.
    parts: dict[str, list[float]] = {k: [] for k in (
        "schedule", "prepare_upload", "graph_launch", "execute_model", "update",
        "step_total")}
    inputs = runner.inputs
    orig_prepare, orig_replay = inputs.prepare_decode, graphs.replay

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            parts[name].append(time.perf_counter() - t)
            return r
        return wrapper

    inputs.prepare_decode = timed("prepare_upload", orig_prepare)
    graphs.replay = timed("graph_launch", orig_replay)
    core.async_scheduling = False  # the loop below steps the parts by hand, in order
    _add(core, random_prompts(1, 128, vocab, 3), 64)
    core.step()
    for v in parts.values():
        v.clear()
    while core.has_unfinished_requests():
        a = time.perf_counter()
        sched = core.scheduler.schedule()
        b = time.perf_counter()
        ro = runner.execute_model_async(sched).result()
        c = time.perf_counter()
        core.scheduler.update_from_output(sched, ro)
        d = time.perf_counter()
        parts["schedule"].append(b - a)
        parts["execute_model"].append(c - b)
        parts["update"].append(d - c)
        parts["step_total"].append(d - a)
    del inputs.prepare_decode, graphs.replay  # back to the class's methods
    core.async_scheduling = True
    res["host_breakdown_us"] = {k: float(np.median(v)) * 1e6 for k, v in parts.items() if v}
    # The pieces of the input upload, each timed alone (GPU idle).
    torch.cuda.synchronize()
    end = 4 * graphs.max_batch_size + 16 + 20
    ev, stage, host = inputs._events[0], inputs.stage, inputs.host[0]
    pieces: dict[str, Any] = {
        "event_synchronize": ev.synchronize,
        "event_record": ev.record,
        "h2d_copy_call": lambda: stage[:end].copy_(host[:end], non_blocking=True),
        "slice_views": lambda: (stage[:end], host[:end]),
        "cuda_sync": torch.cuda.synchronize,
    }
    micro = {}
    for name, fn in pieces.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        micro[name] = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
    res["upload_pieces_us"] = micro
    from vserve.ops.linear import choices

    res["gemv_choices"] = choices()

    # Batch 256, in-process: 256 x (128 prompt, 128 output).
    n = 256
    _add(core, random_prompts(n, 128, vocab, 4), 128)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while core.has_unfinished_requests():
        core.step()
    torch.cuda.synchronize()
    res["engine_batch256_output_tokens_per_s"] = n * 128 / (time.perf_counter() - t0)

    churn = _churn(core, vocab)
    if args.profile:  # a separate run: the profiler's own time must not count above
        _churn(core, vocab, total=400, profile_to=out / "profile_churn.txt")
    res["engine_churn256_output_tokens_per_s"] = churn.pop("output_tokens_per_s")
    res["engine_churn256"] = churn
    res["mixed_graph_replays"] = runner.mixed_graphs.replays if runner.mixed_graphs else 0

    if args.profile:
        profile_steps(core, out, vocab)
    del graphs, runner, core
    gc.collect()
    torch.cuda.empty_cache()
    return res


def engine_no_mixed_graphs(model_dir: Path) -> dict[str, Any]:
    """Side by side with ``engine_decode``: the same engine with steps holding prompt chunks
    run eagerly (``--no-mixed-step-graphs``), in its own process."""
    vocab = VOCAB
    core = _engine(model_dir, 256, mixed_step_graphs=False)
    _add(core, random_prompts(2, 128, vocab, 2), 8)
    while core.has_unfinished_requests():
        core.step()
    res: dict[str, Any] = {"engine_prefill_128_ms_all": _prefill_ms(core, vocab)}
    churn = _churn(core, vocab)
    res["engine_churn256_output_tokens_per_s"] = churn.pop("output_tokens_per_s")
    res["engine_churn256"] = churn
    return res


def profile_steps(core: Any, out: Path, vocab: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for bs in (1, 256):
        _add(core, random_prompts(bs, 128, vocab, 5 + bs), 40)
        while any(r.num_computed_tokens < r.num_prompt_tokens
                  for r in core.scheduler.requests.values()):
            core.step()
        for _ in range(5):
            core.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                core.step()
            torch.cuda.synchronize()
        while core.has_unfinished_requests():
            core.step()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (out / f"profile_decode_bs{bs}.txt").write_text(
            f"10 decode steps at batch {bs}\n\n== by GPU time ==\n{table}\n\n"
            f"== by CPU time ==\n{cpu_table}\n")
        log(f"profile bs={bs}:\n{table}")


# ---- 3. serving -----------------------------------------------------------------------------
_SERVING = re.compile(r"vserve is serving .* on (http://\S+)")


class Server:
    def __init__(self, model_dir: Path, extra: list[str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="vserve-gpu-", suffix=".log")[1])
        self._f = open(self.log, "w")  # noqa: SIM115
        argv = [sys.executable, "-m", "vserve.cli.main", "serve", str(model_dir), "--port", "0",
                "--max-model-len", "4096", "--max-num-seqs", "256", "--log-stats-interval",
                "0", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            m = _SERVING.search(text)
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"vserve serve exited:\n{text[-4000:]}")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"vserve serve did not start:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._f.close()


def http_sweep(model_dir: Path, concurrencies: list[int], out: Path,
               api_servers: int, extra: list[str] | None = None,
               requests_per_slot: int = 2) -> dict[str, Any]:
    from vserve.bench.cli import add_bench_serve_args
    from vserve.bench.runner import run_benchmark

    srv = Server(model_dir, ["--api-server-count", str(api_servers), *(extra or [])])
    results: dict[str, Any] = {}
    try:
        ready_lines = [ln for ln in srv.log.read_text().splitlines()
                       if "KV blocks" in ln or "GPU memory" in ln or "CUDA graphs" in ln]
        results["server_log"] = ready_lines
        for conc in concurrencies:
            n = max(8, requests_per_slot * conc) if conc > 1 else 8
            p = argparse.ArgumentParser()
            add_bench_serve_args(p)
            a = p.parse_args([
                "--base-url", srv.url, "--endpoint-type", "completions", "--stream",
                "--num-prompts", str(n), "--input-len", "128", "--output-len", "128",
                "--max-concurrency", str(conc), "--num-warmups", str(min(conc, 16)),
                "--num-clients", str(1 if conc < 64 else 4),
                "--disable-tqdm", "--quiet",
                "--extra-body", '{"temperature": 0}'])
            r = run_benchmark(a, log=lambda m: None)
            results[f"c{conc}"] = {k: r.get(k) for k in (
                "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                "median_itl_ms", "errors")}
            log(f"HTTP concurrency {conc}: {results[f'c{conc}']}")
    finally:
        srv.stop()
        results["server_log_tail"] = srv.log.read_text(errors="replace")[-3000:]
    return results


def offline_sweep(model_dir: Path, concurrencies: list[int]) -> dict[str, Any]:
    """Without HTTP: vserve.LLM (engine process + ZMQ); each wave is ``conc`` requests."""
    from vserve import LLM, SamplingParams

    results: dict[str, Any] = {}
    with LLM(str(model_dir), max_model_len=4096, max_num_seqs=256) as llm:
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in random_prompts(8, 128, 128256, 9)],
                     params, use_tqdm=False)
        for conc in concurrencies:
            prompts = random_prompts(max(conc, 4), 128, 128256, 10 + conc)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            results[f"c{conc}"] = {"output_throughput": toks / dt, "duration": dt,
                                   "total_output_tokens": toks}
            log(f"offline concurrency {conc}: {results[f'c{conc}']}")
    return results


# ---- 4. HF transformers ---------------------------------------------------------------------
def hf_generate(model_dir: Path, batch: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    res: dict[str, Any] = {}
    for bs, new in ((1, 128), (batch, 128)):
        ids = torch.tensor(random_prompts(bs, 128, 128256, 20 + bs), device="cuda")
        with torch.no_grad():
            model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res[f"hf_bs{bs}_output_tokens_per_s"] = bs * new / dt
        log(f"HF generate batch {bs}: {bs * new / dt:.0f} output tokens/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


ORACLE_PROMPTS = ((32, 31), (100, 32), (500, 33))  # (length, seed)
ORACLE_TOKENS = 16


def hf_oracle(model_dir: Path) -> dict[str, Any]:
    """transformers' greedy tokens (bf16, SDPA) and their logprobs for the oracle prompts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    rows = []
    for length, seed in ORACLE_PROMPTS:
        ids = torch.tensor(random_prompts(1, length, VOCAB, seed), device="cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=ORACLE_TOKENS,
                                 min_new_tokens=ORACLE_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0, eos_token_id=None)
        tokens = out.sequences[0, length:].tolist()
        lps = [torch.log_softmax(sc[0].float(), -1) for sc in out.scores]
        rows.append({"tokens": tokens,
                     "logprobs": [lp[t].item() for lp, t in zip(lps, tokens)],
                     # the gap between HF's top two: a near-tie may flip under other kernels
                     "top2_gap": [(lp.topk(2).values[0] - lp.topk(2).values[1]).item()
                                  for lp in lps]})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"prompts": rows}


def compare_with_oracle(core: Any, oracle: dict[str, Any]) -> dict[str, Any]:
    """The engine's greedy tokens for the oracle prompts against transformers': how many
    of the first tokens agree, and the largest logprob difference over those."""
    from vserve.protocol.requests import EngineCoreRequest
    from vserve.protocol.sampling import SamplingParams

    out = []
    for (length, seed), ref in zip(ORACLE_PROMPTS, oracle["prompts"]):
        params = SamplingParams(temperature=0, max_tokens=ORACLE_TOKENS, ignore_eos=True,
                                logprobs=0)
        rid = f"oracle-{seed}"
        core.add_request(EngineCoreRequest(rid, random_prompts(1, length, VOCAB, seed)[0],
                                           params, [], time.time()))
        tokens: list[int] = []
        lps: list[float] = []
        while core.has_unfinished_requests():
            for outs in core.step().values():
                for o in outs.unpack():
                    tokens.extend(o.new_token_ids)
                    if o.new_logprobs is not None:
                        lps.extend(row[0] for row in o.new_logprobs.logprobs)
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref["tokens"])) if a != b),
                    len(tokens))
        out.append({"prompt_len": length, "first_tokens_equal": same,
                    "max_logprob_diff": max((abs(a - b) for a, b in
                                             zip(lps[:same], ref["logprobs"][:same])),
                                            default=None),
                    "hf_top2_gap_at_divergence": (ref["top2_gap"][same]
                                                  if same < len(ref["top2_gap"]) else None)})
    return {"per_prompt": out}


def run_part(part: str, model_dir: Path, weight_bytes: int, bw: float,
             args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one part in a child process (``--part``); returns its JSON, or the error."""
    result = out / f"part_{part}.json"
    argv = [sys.executable, __file__, "--part", part, "--out", str(out), "--model-dir",
            str(model_dir), "--copy-bw", str(bw), "--weight-bytes", str(weight_bytes),
            "--decode-tokens", str(args.decode_tokens), "--hf-batch", str(args.hf_batch),
            "--shape", args.shape, "--peak-tflops", str(args.peak_tflops or 0)]
    if args.quantization:
        argv += ["--quantization", args.quantization]
    argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.profile:
        argv.append("--profile")
    if args.quick:
        argv.append("--quick")
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"part {part} exited with {proc.returncode}"}
    return json.loads(result.read_text())


def gpt_fast(model_py: Path, model_dir: Path, batches: str) -> dict[str, Any]:
    """gpt-fast decoding the same shape (bf16), in its own process."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpt_fast_peer.py"),
                           "--model-py", str(model_py), "--config",
                           str(model_dir / "config.json"), "--batches", batches],
                          capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not rows:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return {f"bs{r['batch']}": r for r in rows}


def child(args: argparse.Namespace) -> None:
    global QUANTIZATION, KV_CACHE_DTYPE
    QUANTIZATION = args.quantization
    KV_CACHE_DTYPE = args.kv_cache_dtype
    out = Path(args.out)
    model_dir = Path(args.model_dir)
    if args.part == "engine":
        res = engine_decode(model_dir, args.weight_bytes, args.copy_bw, args, out)
    elif args.part == "engine_no_mixed":
        res = engine_no_mixed_graphs(model_dir)
    elif args.part == "hf_oracle":
        res = hf_oracle(model_dir)
    else:
        res = hf_generate(model_dir, args.hf_batch)
    (out / f"part_{args.part}.json").write_text(json.dumps(res, indent=2, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["engine", "engine_no_mixed", "hf", "hf_oracle"],
                   default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--copy-bw", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--weight-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="gpu-bench")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint written before")
    p.add_argument("--decode-tokens", type=int, default=512)
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--api-server-count", default="4",
                   help="API servers of the HTTP runs; a list (4,8) runs each")
    p.add_argument("--serve-variant", action="append", default=None, metavar="ARGS",
                   help="extra `vserve serve` arguments of one HTTP configuration (repeat to "
                        "compare side by side, e.g. '' and '--no-mixed-step-graphs')")
    p.add_argument("--hf-batch", type=int, default=256)
    p.add_argument("--requests-per-slot", type=int, default=2,
                   help="HTTP runs send this many times the concurrency in requests")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--offline", action="store_true", help="sweep through vserve.LLM, no HTTP")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="engine part: decode, graph steps, prefill and the oracle only (no "
                        "host breakdown, batch 256 or churn)")
    p.add_argument("--check-hf", action="store_true",
                   help="compare the engine's greedy tokens with transformers' (bf16) first")
    p.add_argument("--skip-no-mixed", action="store_true",
                   help="skip the engine run with mixed-step graphs off")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--quantization", choices=["fp8"], default=None)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="of every engine and server this run starts")
    p.add_argument("--gpt-fast", type=Path, default=None, metavar="MODEL_PY",
                   help="gpt-fast's model.py: run the peer on the same shape in this run")
    p.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        child(args)
        return
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                               "torch": torch.__version__}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        pass
    bw = copy_bandwidth()
    summary["copy_bandwidth_gbps"] = bw / 1e9
    args.peak_tflops = summary["matmul_peak_tflops"] = matmul_peak_tflops()
    summary["shape"], summary["quantization"] = args.shape, args.quantization
    summary["kv_cache_dtype"] = args.kv_cache_dtype
    log(f"device {summary['device']}: copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul "
        f"{args.peak_tflops:.0f} TFLOP/s")
    t0 = time.perf_counter()
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = make_model(Path(tempfile.mkdtemp(prefix=f"llama{args.shape}-")),
                               SHAPES[args.shape])
    weight_bytes = step_bytes(SHAPES[args.shape], args.quantization)
    summary["weight_bytes"] = weight_bytes
    summary["bandwidth_bound_tokens_per_s_weights_only"] = bw / weight_bytes
    log(f"model at {model_dir}: {weight_bytes / 1e9:.3f} GB of weights "
        f"({time.perf_counter() - t0:.0f}s); bandwidth bound {bw / weight_bytes:.0f} tokens/s")

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    if args.check_hf and not args.skip_engine:
        summary["hf_oracle"] = run_part("hf_oracle", model_dir, weight_bytes, bw, args, out)
        save()
    if not args.skip_engine:
        # In a child process, so that all its GPU memory is gone before the server starts.
        summary["engine"] = run_part("engine", model_dir, weight_bytes, bw, args, out)
        log(f"engine: {json.dumps(summary['engine'], indent=1)}")
        save()
        if not args.skip_no_mixed:
            summary["engine_no_mixed"] = run_part("engine_no_mixed", model_dir, weight_bytes,
                                                  bw, args, out)
            log(f"engine, mixed-step graphs off: {json.dumps(summary['engine_no_mixed'])}")
            save()
    concs = [int(c) for c in args.concurrency.split(",") if c]
    if not args.skip_http:
        mode = "offline" if args.offline else "http"
        if not args.offline:
            try:
                counts = [int(c) for c in args.api_server_count.split(",") if c]
                variants = args.serve_variant or [""]
                runs: dict[str, Any] = {}
                quant = ["--quantization", args.quantization] if args.quantization else []
                if args.kv_cache_dtype != "auto":  # else a variant may set it
                    quant += ["--kv-cache-dtype", args.kv_cache_dtype]
                for count in counts:
                    for variant in variants:
                        label = f"api{count} {variant}".strip()
                        runs[label] = http_sweep(model_dir, concs, out, count,
                                                 shlex.split(variant) + quant,
                                                 args.requests_per_slot)
                        log(f"serving [{label}] done")
                        summary["serving_runs"] = runs
                        save()
                summary["serving"] = runs[next(iter(runs))]
                summary["api_server_count"] = counts[0]
            except Exception as e:
                log(f"HTTP serving failed ({e!r}); measuring through vserve.LLM instead")
                summary["http_error"] = repr(e)[-3000:]
                mode = "offline"
        if mode == "offline":
            summary["serving"] = offline_sweep(model_dir, concs)
        summary["serving_mode"] = mode
        save()
    if not args.skip_hf:
        summary["hf"] = run_part("hf", model_dir, weight_bytes, bw, args, out)
        save()
    if args.gpt_fast:
        summary["gpt_fast"] = gpt_fast(args.gpt_fast, model_dir, "1,64")
        log(f"gpt-fast: {summary['gpt_fast']}")
    save()
    print(report(summary))


def report(s: dict[str, Any]) -> str:
    e = s.get("engine", {})
    lines = [f"device: {s['device']}  torch {s['torch']}  triton {s.get('triton')}; shape "
             f"{s.get('shape')}, {s.get('quantization') or 'bf16'}, KV cache "
             f"{s.get('kv_cache_dtype', 'auto')}; bf16 matmul peak "
             f"{s.get('matmul_peak_tflops', 0):.0f} TFLOP/s",
             f"copy bandwidth: {s['copy_bandwidth_gbps']:.0f} GB/s; weights "
             f"{s['weight_bytes'] / 1e9:.3f} GB → bound "
             f"{s['bandwidth_bound_tokens_per_s_weights_only']:.0f} tokens/s for one request"]
    if e and "error" in e:
        lines.append(f"engine part: {e['error']}")
    elif e:
        lines += [
            f"engine, 1 request: {e['engine_decode_tokens_per_s']:.0f} tokens/s "
            f"({e['achieved_gbps_engine']:.0f} GB/s), step {e['engine_step_ms_median']:.3f} ms "
            f"= GPU {e['graph_step_ms_bs1']:.3f} ms ({e['graph_gbps_bs1']:.0f} GB/s) + host "
            f"{e['host_overhead_ms_per_step']:.3f} ms (async scheduling)",
            f"engine, 1 request, async scheduling off: "
            f"{e['engine_decode_tokens_per_s_sync']:.0f} tokens/s, step "
            f"{e['engine_step_ms_median_sync']:.3f} ms; host parts of a sync step (us) "
            f"{ {k: round(v, 1) for k, v in e.get('host_breakdown_us', {}).items()} }",
            f"engine, prefill of 128 tokens: {e['engine_prefill_128_ms']:.1f} ms (median of "
            f"{len(e['engine_prefill_128_ms_all'])}); GEMV choices {e.get('gemv_choices')}",
            "graph step: " + ", ".join(
                f"bs{b} {e[f'graph_step_ms_bs{b}']:.3f} ms ({e[f'graph_tokens_per_s_bs{b}']:.0f} "
                f"tok/s, {e[f'graph_gbps_bs{b}']:.0f} GB/s)"
                for b in (1, 16, 64, 256) if f"graph_step_ms_bs{b}" in e),
            f"engine, 256 x (128 in, 128 out), in process: "
            f"{e.get('engine_batch256_output_tokens_per_s', 0):.0f} output tokens/s; steady churn "
            f"(256 in flight, 64..192 out): {e.get('engine_churn256_output_tokens_per_s', 0):.0f}"
            f" ({e.get('mixed_graph_replays')} mixed-step graph replays, per step "
            f"{e.get('engine_churn256')})",
            f"KV blocks {e['num_kv_blocks']}, max concurrency at 4096 tokens "
            f"{e['max_concurrency_at_4096']:.1f}",
            f"engine, 64 requests decoding: {e['engine_batch64_decode_tokens_per_s']:.0f} "
            f"tokens/s; prefill of 8 x 2048 tokens: {e['prefill_8x2048']}",
            f"single request at {e['engine_decode_tokens_per_s'] / s['bandwidth_bound_tokens_per_s_weights_only']:.0%}"
            " of the weights' copy-bandwidth bound",
            f"against transformers (bf16 greedy): {e.get('hf_oracle')}"]
    g = s.get("gpt_fast") or {}
    if "bs1" in g:
        lines.append(
            f"gpt-fast (bf16, same run): bs1 {g['bs1']['tokens_per_s']:.0f} tokens/s "
            f"({g['bs1']['achieved_gbps_weights']:.0f} GB/s), bs64 "
            f"{g.get('bs64', {}).get('tokens_per_s', 0):.0f}; vserve / gpt-fast: bs1 "
            f"{e.get('engine_decode_tokens_per_s', 0) / g['bs1']['tokens_per_s']:.2f}x, bs64 "
            f"{e.get('engine_batch64_decode_tokens_per_s', 0) / max(1, g.get('bs64', {}).get('tokens_per_s', 0)):.2f}x")
    elif g:
        lines.append(f"gpt-fast: {g}")
    off = s.get("engine_no_mixed") or {}
    if "engine_churn256_output_tokens_per_s" in off:
        lines.append(
            f"engine, mixed-step graphs off: churn {off['engine_churn256_output_tokens_per_s']:.0f}"
            f" output tokens/s (per step {off['engine_churn256']}); prefill of 128 tokens "
            f"{np.median(off['engine_prefill_128_ms_all']):.1f} ms")
    for label, run in (s.get("serving_runs") or {}).items():
        for k, v in run.items():
            if k.startswith("c") and isinstance(v, dict) and v.get("output_throughput"):
                lines.append(f"  [{label}] concurrency {k[1:]}: {v['output_throughput']:.0f} "
                             f"output tokens/s, TTFT median {v.get('median_ttft_ms') or 0:.1f} "
                             f"ms, failed {v.get('failed')}")
    sv = s.get("serving")
    if sv:
        lines.append(f"serving ({s.get('serving_mode')}), 128 in / 128 out:")
        for k, v in sv.items():
            if k.startswith("c") and isinstance(v, dict):
                extra = ""
                if v.get("median_ttft_ms") is not None:
                    extra = (f", TTFT median {v['median_ttft_ms']:.1f} ms, TPOT median "
                             f"{v['median_tpot_ms']:.2f} ms")
                lines.append(f"  concurrency {k[1:]}: {v['output_throughput']:.0f} output "
                             f"tokens/s{extra}")
    hf = s.get("hf")
    if hf:
        lines.append("HF generate: " + ", ".join(
            f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in hf.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
