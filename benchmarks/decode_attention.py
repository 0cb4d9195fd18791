"""Decode attention over the paged KV cache: achieved GB/s per launch configuration.

One decode step's attention for every layer (distinct caches per layer, so the L2 cannot
serve one layer's reads from the previous one), captured in a CUDA graph and replayed, for
each ``(BLOCK_N, num_warps, num_stages, splits)`` in the sweep; each configuration's output is
checked against the default's. Bytes counted: the K and V of every cached token read once,
plus q, k, v and the output. ``--kv-cache-dtype fp8`` runs over float8 caches (one byte per
element), as ``vserve serve --kv-cache-dtype fp8`` does.

    python benchmarks/decode_attention.py --shape 1b --batch 1,64,256 --min-ctx 128 \
        --max-ctx 256 --out /tmp/attn.json

Needs CUDA (the kernels are Triton).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

SHAPES = {"1b": (32, 8, 64, 16), "8b": (32, 8, 128, 32)}  # q heads, kv heads, head dim, layers


def make_step(batch: int, min_ctx: int, max_ctx: int, heads: int, kv_heads: int, dim: int,
              layers: int, block: int, seed: int,
              kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    rng = random.Random(seed)
    lens = [rng.randint(min_ctx, max_ctx) for _ in range(batch)]
    width = max(-(-n // block) for n in lens)
    num_blocks = sum(-(-n // block) for n in lens) + 1
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    table = torch.zeros(batch, width, dtype=torch.int32)
    slots = []
    it = iter(perm)
    for s, n in enumerate(lens):
        for b in range(-(-n // block)):
            table[s, b] = next(it)
        slots.append(int(table[s, (n - 1) // block]) * block + (n - 1) % block)
    dev = "cuda"
    dt = torch.bfloat16
    caches = [(torch.randn(num_blocks, block, kv_heads, dim, dtype=dt, device=dev).to(kv_dtype),
               torch.randn(num_blocks, block, kv_heads, dim, dtype=dt, device=dev).to(kv_dtype))
              for _ in range(layers)]
    return {
        "lens": lens,
        "q": torch.randn(batch, heads, dim, dtype=dt, device=dev),
        "k": torch.randn(batch, kv_heads, dim, dtype=dt, device=dev),
        "v": torch.randn(batch, kv_heads, dim, dtype=dt, device=dev),
        "out": torch.empty(batch, heads, dim, dtype=dt, device=dev),
        "caches": caches,
        "table": table.to(dev),
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=dev),
        "slots": torch.tensor(slots, dtype=torch.int64, device=dev),
        "positions": torch.tensor([n - 1 for n in lens], dtype=torch.int64, device=dev),
    }


def time_config(step: dict, tuning, splits, cos, sin, replays: int = 20) -> tuple[float, torch.Tensor]:
    from vserve.ops.attention import decode_attention

    def one_step() -> None:
        for kc, vc in step["caches"]:
            decode_attention(step["q"], step["k"], step["v"], kc, vc, step["table"],
                             step["seq_lens"], step["slots"], 0.125, step["out"],
                             positions=step["positions"], cos_cache=cos, sin_cache=sin,
                             num_splits=splits, tuning=tuning)

    one_step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    per_layer_us = start.elapsed_time(end) * 1000 / replays / len(step["caches"])
    return per_layer_us, step["out"].clone()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--batch", default="1,64,256")
    p.add_argument("--min-ctx", type=int, default=128)
    p.add_argument("--max-ctx", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--stages", default="1,2,3,4")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from vserve.ops.attention import decode_splits

    heads, kv_heads, dim, layers = SHAPES[args.shape]
    max_pos = args.max_ctx + 1
    inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    cos, sin = freqs.cos().cuda(), freqs.sin().cuda()
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        step = make_step(batch, args.min_ctx, args.max_ctx, heads, kv_heads, dim, layers,
                         args.block_size, seed=batch, kv_dtype=kv_dtype)
        kv_bytes = (sum(n - 1 for n in step["lens"]) * kv_heads * dim * 2
                    * kv_dtype.itemsize)
        io_bytes = batch * (2 * heads + 2 * kv_heads) * dim * 2
        nbytes = kv_bytes + io_bytes
        auto = decode_splits(batch, kv_heads, torch.device("cuda"))
        split_opts = sorted({auto, *(s for s in (1, 2, 4) if batch >= 64)})
        base_us, base_out = time_config(step, None, auto, cos, sin)
        print(f"batch {batch} ctx {args.min_ctx}..{args.max_ctx}: default (64,4,2) splits "
              f"{auto}: {base_us:.1f} us/layer {nbytes / base_us / 1e3:.0f} GB/s", flush=True)
        results.append({"batch": batch, "tuning": None, "splits": auto, "us": base_us,
                        "gbps": nbytes / base_us / 1e3})
        for bn, w, st, sp in itertools.product(
                [int(x) for x in args.block_n.split(",")], [int(x) for x in args.warps.split(",")],
                [int(x) for x in args.stages.split(",")], split_opts):
            try:
                us, out = time_config(step, (bn, w, st), sp, cos, sin)
            except Exception as e:  # out of shared memory or registers for this tiling
                print(f"  ({bn},{w},{st}) splits {sp}: {type(e).__name__}", flush=True)
                continue
            err = (out.float() - base_out.float()).abs().max().item()
            ok = err < 3e-2
            results.append({"batch": batch, "tuning": [bn, w, st], "splits": sp, "us": us,
                            "gbps": nbytes / us / 1e3, "max_err": err, "ok": ok})
            print(f"  ({bn},{w},{st}) splits {sp}: {us:6.1f} us/layer "
                  f"{nbytes / us / 1e3:5.0f} GB/s {'' if ok else f'WRONG err {err:.3g}'}",
                  flush=True)
        best = min((r for r in results if r["batch"] == batch and r.get("ok", True)),
                   key=lambda r: r["us"])
        print(f"batch {batch}: best {best['tuning']} splits {best['splits']} "
              f"{best['us']:.1f} us ({base_us / best['us']:.2f}x default)", flush=True)
        del step
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
