"""Matrix-vector products for single-token decode (``M == 1``), with the choice made by
measurement.

cuBLAS serves the matmuls; for one row its kernels for the smaller projections of a 1B
model read the weights at 50-60% of the copy bandwidth (an H100 profile: q/k/v and o_proj
~6.5 us for 10 MB on average, down_proj split-K + reduce 15 us for 33 MB). A plain
Triton GEMV (each program a few output rows, the whole K dimension, float32 accumulation)
streams the weights with 16-byte loads. Which is faster depends on the shape and the card,
so the first time a shape is seen outside a CUDA-graph capture, every candidate (cuBLAS and
a few GEMV tilings) is timed with CUDA events — cycling through copies of the weight so that
it streams from HBM as in a real step, not from the 50 MB L2 — and the fastest is kept for
the process (a GEMV must beat cuBLAS by 3%).

``act=True`` fuses SiLU-and-multiply into the GEMV's input: ``x`` is the ``[1, 2K]``
gate/up row and ``silu(x[:K]) * x[K:]`` is formed on the fly, with the same rounding
points as ``vserve.ops.activation.silu_and_mul`` (so the MLP's down projection reads the
gate/up output directly, one launch instead of two).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vserve import envs
from vserve.ops import pdl
from vserve.ops.activation import silu_and_mul

# (BLOCK_N, BLOCK_K, num_warps): a few rows × a long stretch of K per program; "K" is
# replaced by the layer's K (rounded up to a power of two, at most 8192): one iteration,
# all of a program's loads issued at once.
_CANDIDATES = ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 4), (32, 256, 8),
               (1, "K", 4), (2, "K", 4), (2, "K", 8), (4, "K", 8))
_L2_BYTES = 50 << 20  # H100; timing rotates over enough weight copies to defeat the L2
_ENABLED = envs.gemv_enabled()
_CHOICE: dict[tuple, tuple[int, int, int] | None] = {}  # None: cuBLAS


@triton.jit
def _gemv_input(x_ptr, rk, K, ACT: tl.constexpr, EVEN: tl.constexpr):
    """The input tile ``rk`` of a GEMV: ``x[rk]``, or ``silu(x[rk]) * x[K + rk]``."""
    if EVEN:
        if ACT:
            g = tl.load(x_ptr + rk)
            u = tl.load(x_ptr + K + rk)
        else:
            x = tl.load(x_ptr + rk)
    else:
        kmask = rk < K
        if ACT:
            g = tl.load(x_ptr + rk, mask=kmask, other=0.0)
            u = tl.load(x_ptr + K + rk, mask=kmask, other=0.0)
        else:
            x = tl.load(x_ptr + rk, mask=kmask, other=0.0)
    if ACT:
        gf = g.to(tl.float32)
        a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        x = (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    return x


@triton.jit
def _weight_tile(w_rows, rk, nmask, K, EVEN: tl.constexpr):
    # Weights are read once per step: keep them from evicting activations from the L2.
    if EVEN:
        return tl.load(w_rows + rk[None, :], eviction_policy="evict_first")
    return tl.load(w_rows + rk[None, :], mask=nmask[:, None] & (rk < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, s_wn,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * s_wn
    # The first weight tile is requested before waiting for the previous kernel (PDL):
    # weights never depend on it, so their loads overlap its last blocks.
    rk = tl.arange(0, BLOCK_K)
    w = _weight_tile(w_rows, rk, nmask, K, EVEN)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = _gemv_input(x_ptr, rk, K, ACT, EVEN)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_rows, rk, nmask, K, EVEN)
        x = _gemv_input(x_ptr, rk, K, ACT, EVEN)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE:  # float8 weights: one scale per output row
        y *= tl.load(s_ptr + rn, mask=nmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    # Rounded to the activations' dtype first, as a matmul in that dtype is, even when the
    # output buffer is float32 (the graphs' logits).
    tl.store(y_ptr + rn, y.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: bool,
         config: tuple[int, int, int], out: torch.Tensor | None = None,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, K]`` × ``weight`` ``[N, K]`` → ``[1, N]``; ``scale`` (float32 ``[N]``): the
    per-row scales of float8 weights."""
    n, k = weight.shape
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight,
        out, n, k, weight.stride(0), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        ACT=act, EVEN=(n % block_n == 0 and k % block_k == 0),
        BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl(), num_warps=warps, launch_pdl=pdl(),
    )
    return out


def _cublas(x, weight, bias, act):
    return F.linear(silu_and_mul(x) if act else x, weight, bias)


def _time(fn, n: int, reps: int = 30) -> float:
    """GPU time per call (ms), the mean over ``reps`` calls cycling through ``n`` weight
    copies. The GPU is held busy (``torch.cuda._sleep``) while the calls are queued, so the
    events measure the kernels back to back, as a CUDA graph runs them, not the host's
    launch overhead (which can exceed a small GEMV's time)."""
    for i in range(3):
        fn(i % n)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(20_000_000)  # ~10 ms: longer than queueing ``reps`` launches
    start.record()
    for i in range(reps):
        fn(i % n)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _configs(k: int) -> list[tuple[int, int, int]]:
    whole = min(8192, triton.next_power_of_2(k))
    out: list[tuple[int, int, int]] = []
    for bn, bk_spec, warps in _CANDIDATES:
        bk = whole if bk_spec == "K" else int(bk_spec)
        if bk > whole:
            continue
        if (bn, bk, warps) not in out:
            out.append((bn, bk, warps))
    return out or [(4, whole, 4)]


def _weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` and enough clones of it that cycling through them streams from HBM, not
    from the L2, as one step does."""
    nbytes = weight.numel() * weight.element_size()
    copies = max(1, min(16, -(-3 * _L2_BYTES // nbytes)))
    return [weight] + [weight.clone() for _ in range(copies - 1)]


def choose_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: bool,
                baseline: Callable[[torch.Tensor], Any], scale: torch.Tensor | None = None,
                ) -> tuple[int, int, int] | None:
    """Time ``baseline(weight)`` (the matmul library's path) and each GEMV tiling on
    weights streamed from memory, not the L2: the timing cycles through enough copies of
    the weight to exceed the cache several times. The winning tiling, or None for the
    baseline."""
    ws = _weight_copies(weight)
    copies = len(ws)
    best, best_t = None, _time(lambda i: baseline(ws[i]), copies)
    for cfg in _configs(weight.shape[1]):
        t = _time(lambda i, cfg=cfg: gemv(x, ws[i], bias, act, cfg, scale=scale), copies)
        if t < best_t * 0.97:  # a clear win only; cuBLAS otherwise
            best, best_t = cfg, t
    return best


def gemv_enabled() -> bool:
    """Whether single-row matmuls may take a GEMV (``VSERVE_GEMV``)."""
    return _ENABLED


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ENABLED and x.shape[0] == 1 and x.is_cuda and x.is_contiguous()
            and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           act: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(silu_and_mul(x) if act else x, weight, bias)`` for a CUDA ``x`` of
    ``[M, K]`` (``[M, 2K]`` with ``act``): the measured-fastest kernel when ``M == 1``
    (16-bit weights), cuBLAS otherwise. ``out`` (``[M, N]``, contiguous, ``x``'s dtype or
    float32): written and returned, holding the product rounded to ``x``'s dtype first
    (in ``x``'s dtype, cuBLAS writes it directly: no copy)."""
    if _gemv_applies(x, weight):
        key = (tuple(weight.shape), weight.dtype, bias is not None, act)
        if key not in _CHOICE and not torch.cuda.is_current_stream_capturing():
            _CHOICE[key] = choose_gemv(x, weight, bias, act,
                                       lambda w: _cublas(x, w, bias, act))
        cfg = _CHOICE.get(key)
        if cfg is not None:
            return gemv(x, weight, bias, act, cfg, out)
    if out is not None and out.dtype == x.dtype and bias is None and not act:
        return torch.mm(x, weight.t(), out=out)
    y = _cublas(x, weight, bias, act)
    return y if out is None else out.copy_(y)


def choices() -> dict[str, str]:
    """What was chosen per shape (for logs and benchmarks)."""
    out = {f"{k[0]}{' +act' if k[3] else ''}": ("cublas" if v is None else f"gemv{v}")
           for k, v in _CHOICE.items()}
    out.update({f"{k[0]} +norm{' +res' if k[3] else ''}": ("separate" if v is None
                                                          else f"fused{v}")
                for k, v in _NORM_CHOICE.items()})
    return out


# ---- RMSNorm (+ residual add) fused into a GEMV's input ----------------------------------
@triton.jit
def _normed_input(x_ptr, r_ptr, g_ptr, rk, K, inv, HAS_RES: tl.constexpr):
    """Tile ``rk`` of ``g * rms_norm(x + r)`` (float32, holding the rounded values), given
    the row's ``inv = 1 / rms``."""
    kmask = rk < K
    xt = tl.load(x_ptr + rk, mask=kmask, other=0.0)
    if HAS_RES:
        xt = (xt.to(tl.float32) + tl.load(r_ptr + rk, mask=kmask, other=0.0)
              .to(tl.float32)).to(xt.dtype)
    yt = (xt.to(tl.float32) * inv).to(xt.dtype)
    gt = tl.load(g_ptr + rk, mask=kmask, other=0.0)
    return (gt.to(tl.float32) * yt.to(tl.float32)).to(xt.dtype).to(tl.float32)


@triton.jit
def _norm_gemv_kernel(x_ptr, r_ptr, r_out_ptr, g_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, s_wn,
                      eps, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, K_POW2: tl.constexpr, PDL: tl.constexpr):
    """``y = W @ rms_norm(x + r) (+ b)``; program 0 also stores ``x + r`` to ``r_out``.

    Every program first computes the row's statistics over all of K (the row is a few KB
    and stays in cache), then walks K in tiles, normalizing each tile on the fly, with the
    rounding points of ``vserve.ops.layernorm`` (sum rounded to the activations' dtype, the
    normalized row rounded before the weight multiply, the product rounded once)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * s_wn
    rk = tl.arange(0, BLOCK_K)
    # First weight tile before the wait on the previous kernel (see _gemv_kernel).
    w = _weight_tile(w_rows, rk, nmask, K, False)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    kk = tl.arange(0, K_POW2)
    km = kk < K
    x = tl.load(x_ptr + kk, mask=km, other=0.0)
    if HAS_RES:
        h = (x.to(tl.float32) + tl.load(r_ptr + kk, mask=km, other=0.0).to(tl.float32)
             ).to(x.dtype)
        if pid == 0:
            tl.store(r_out_ptr + kk, h, mask=km)
        hf = h.to(tl.float32)
    else:
        hf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, 0) / K + eps)
    acc = w.to(tl.float32) * _normed_input(x_ptr, r_ptr, g_ptr, rk, K, inv, HAS_RES)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_rows, rk, nmask, K, False)
        acc += w.to(tl.float32) * _normed_input(x_ptr, r_ptr, g_ptr, rk, K, inv,
                                                HAS_RES)[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE:  # float8 weights
        y *= tl.load(s_ptr + rn, mask=nmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


_NORM_CANDIDATES = ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 4), (16, 1024, 8),
                    (32, 256, 8))
_NORM_CHOICE: dict[tuple, tuple[int, int, int] | None] = {}  # None: norm kernel + linear


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
              config: tuple[int, int, int], scale: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(x) if residual is not None else x
    block_n, block_k, warps = config
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, r_out, norm_weight, weight,
        scale if scale is not None else weight, bias if bias is not None else weight, out, n,
        k, weight.stride(0), eps, HAS_RES=residual is not None, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, K_POW2=triton.next_power_of_2(k), PDL=pdl(), num_warps=warps,
        launch_pdl=pdl(),
    )
    return out, r_out


def _separate(x, residual, norm_weight, eps, weight, matmul):
    from vserve.ops.layernorm import fused_add_rms_norm, rms_norm

    if residual is None:
        return matmul(rms_norm(x, norm_weight, eps), weight), x
    h, r = fused_add_rms_norm(x, residual, norm_weight, eps)
    return matmul(h, weight), r


def _choose_norm(x, residual, norm_weight, eps, weight, bias, scale, matmul,
                 ) -> tuple[int, int, int] | None:
    """Time the separate kernels (norm, then ``matmul``: the linear's own choice) against
    each fused tiling, over weight copies streamed from memory as in ``choose_gemv``."""
    ws = _weight_copies(weight)
    copies = len(ws)
    # The separate path works in place: give it its own inputs.
    xs, rs = x.clone(), residual.clone() if residual is not None else None
    best, best_t = None, _time(lambda i: _separate(xs, rs, norm_weight, eps, ws[i], matmul),
                               copies)
    for cfg in _NORM_CANDIDATES:
        if cfg[1] > triton.next_power_of_2(weight.shape[1]):
            continue
        t = _time(lambda i, cfg=cfg: norm_gemv(x, residual, norm_weight, eps, ws[i], bias,
                                               cfg, scale), copies)
        if t < best_t * 0.97:
            best, best_t = cfg, t
    return best


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                scale: torch.Tensor | None = None,
                matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(F.linear(rms_norm(x + residual), weight, bias), x + residual)`` for one CUDA row
    in one kernel, when that was measured faster than the norm kernel and the linear apart;
    None otherwise (the caller runs them apart). Without ``residual``, ``x`` is normalized
    and returned as the residual. Inputs are not modified. Float8 weights come with their
    row ``scale`` and ``matmul(h, weight)``, the layer's own path, to time against."""
    if scale is not None:
        applies = (_ENABLED and x.shape[0] == 1 and x.is_cuda and x.is_contiguous()
                   and weight.dtype == torch.float8_e4m3fn and weight.stride(1) == 1)
    else:
        applies = _gemv_applies(x, weight) and x.dtype == weight.dtype
    if not (applies and (residual is None or residual.is_contiguous())
            and weight.shape[1] <= 8192):
        return None
    key = (tuple(weight.shape), weight.dtype, bias is not None, residual is not None)
    if key not in _NORM_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return None
        if matmul is None:
            matmul = lambda h, w: linear(h, w, bias)  # noqa: E731
        _NORM_CHOICE[key] = _choose_norm(x, residual, norm_weight, eps, weight, bias, scale,
                                         matmul)
    cfg = _NORM_CHOICE[key]
    if cfg is None:
        return None
    return norm_gemv(x, residual, norm_weight, eps, weight, bias, cfg, scale)
