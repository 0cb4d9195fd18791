"""The model's GEMM shapes on the GPU: time, TFLOP/s and GB/s per shape and row count.

Each decoder linear layer of the shape (q/k/v, o, gate/up, down) and the LM head, at the row
counts a step holds (decode batches, mixed steps, prefill), timed in a CUDA graph of many
launches; the BLAS back ends torch offers (cuBLAS, cuBLASLt) side by side, so that a shape
where the library's choice is poor shows up next to the card's peak.

    python benchmarks/gemm_shapes.py --shape 1b --rows 1,64,256,512,2048 --out /tmp/gemm.json

Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# hidden, q heads, kv heads, head dim, intermediate, vocab
SHAPES = {"1b": (2048, 32, 8, 64, 8192, 128256), "8b": (4096, 32, 8, 128, 14336, 128256)}


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """name → (N, K) of ``x[M, K] @ W[N, K].T``."""
    h, nq, nkv, d, inter, vocab = SHAPES[shape]
    return {"qkv": ((nq + 2 * nkv) * d, h), "o": (h, nq * d),
            "gate_up": (2 * inter, h), "down": (h, inter), "lm_head": (vocab, h)}


def time_mm(m: int, n: int, k: int, launches: int = 20, replays: int = 10) -> float:
    """Seconds per ``torch.mm`` of ``[m, k] @ [k, n]`` (weights distinct per launch, so the
    L2 cannot hold them across launches)."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    copies = max(1, min(launches, int(2e9 // (n * k * 2))))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    for w in ws:
        torch.mm(x, w.t(), out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            torch.mm(x, ws[i % copies].t(), out=out)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / launches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rows", default="1,64,256,512,2048")
    p.add_argument("--backends", default="cublas,cublaslt")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    shapes = layer_shapes(a.shape)
    layers = {"1b": 16, "8b": 32}[a.shape]
    results = []
    for backend in a.backends.split(","):
        torch.backends.cuda.preferred_blas_library(backend)
        for m in (int(r) for r in a.rows.split(",")):
            step = 0.0
            for name, (n, k) in shapes.items():
                t = time_mm(m, n, k)
                tflops = 2 * m * n * k / t / 1e12
                gbps = 2 * (n * k + m * k + m * n) / t / 1e9
                step += t * (1 if name == "lm_head" else layers)
                results.append({"backend": backend, "rows": m, "name": name, "n": n, "k": k,
                                "us": t * 1e6, "tflops": tflops, "gbps": gbps})
                print(f"{backend:9} M={m:5} {name:8} N={n:6} K={k:5}: {t * 1e6:8.1f} us "
                      f"{tflops:6.1f} TFLOP/s {gbps:6.0f} GB/s", flush=True)
            print(f"{backend:9} M={m:5} all linear layers of one step: {step * 1e3:.3f} ms",
                  flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
