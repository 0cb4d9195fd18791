"""FP8 linear layers on the GPU: float8 e4m3 weights with per-output-channel scales.

Two paths, as for 16-bit weights (:mod:`vserve.ops.linear`):

* one row (single-request decode): the GEMV of :mod:`vserve.ops.linear` reading the float8
  weights (half the bytes of bf16) and applying the row scales after the dot product — the
  activations stay 16-bit, so this is the CPU reference's arithmetic. It competes, by
  measurement, with the path below;
* more rows: the activations are quantized per token (or by the checkpoint's static scale)
  in one pass — SiLU-and-multiply fused in for the down projection — and multiplied on the
  float8 tensor cores by ``torch._scaled_mm`` with row-wise scales (cuBLAS, Hopper), the
  result in the activations' dtype. A weight-only checkpoint (no activation scheme)
  multiplies the dequantized weights instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vserve.ops import linear as lin
from vserve.ops.activation import silu_and_mul

_BLOCK = 1024  # elements of a row per iteration; 448 below is float8 e4m3's largest value


@triton.jit
def _row_tile(x_ptr, rk, K, ACT: tl.constexpr):
    """Tile ``rk`` of a row: ``x[rk]``, or ``silu(x[rk]) * x[K + rk]`` rounded as
    ``vserve.ops.activation.silu_and_mul`` rounds it; float32."""
    m = rk < K
    if ACT:
        g = tl.load(x_ptr + rk, mask=m, other=0.0)
        u = tl.load(x_ptr + K + rk, mask=m, other=0.0)
        gf = g.to(tl.float32)
        a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        return (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    return tl.load(x_ptr + rk, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _quantize_rows_kernel(x_ptr, s_xm, q_ptr, scale_ptr, static_ptr, K,
                          STATIC: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: its scale (largest magnitude / 448, or the static scale), then
    the row divided by it, saturated and rounded to float8 e4m3."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * s_xm
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            amax = tl.maximum(amax, tl.abs(_row_tile(x_row, k0 + tl.arange(0, BLOCK), K, ACT)))
        scale = tl.maximum(tl.max(amax, 0) / 448.0, 1e-12)
    tl.store(scale_ptr + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        q = tl.clamp(_row_tile(x_row, rk, K, ACT) * inv, -448.0, 448.0)
        tl.store(q_ptr + row * K + rk, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=rk < K)


def quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None,
                  act: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` (``[M, 2K]`` with ``act``: ``silu(gate) * up`` is quantized) →
    (float8 ``[M, K]``, float32 scales ``[M, 1]``), scaled per row unless ``static_scale``
    (float32 ``[1]``) is given."""
    m, width = x.shape
    k = width // 2 if act else width
    assert x.stride(1) == 1
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](
            x, x.stride(0), q, scales, static_scale if static_scale is not None else scales,
            k, STATIC=static_scale is not None, ACT=act, BLOCK=min(_BLOCK,
                                                                   triton.next_power_of_2(k)),
            num_warps=4)
    return q, scales


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, act: bool, input_scale: torch.Tensor | None
              ) -> torch.Tensor:
    """``[M, K]`` 16-bit activations × float8 ``weight`` ``[N, K]`` on the float8 tensor
    cores: activations quantized per row (or by ``input_scale``), row-wise scales on both
    sides, the product in ``x``'s dtype."""
    q, sx = quantize_rows(x, input_scale, act)
    # Row-wise scaling writes bfloat16; other activation dtypes take one conversion.
    y = torch._scaled_mm(q, weight.t(), scale_a=sx, scale_b=weight_scale.view(1, -1),
                         out_dtype=torch.bfloat16)
    if x.dtype != torch.bfloat16:
        y = y.to(x.dtype)
    if bias is not None:
        y += bias
    return y


def _weight_only(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, act: bool) -> torch.Tensor:
    w = (weight.to(torch.float32) * weight_scale[:, None]).to(x.dtype)
    return F.linear(silu_and_mul(x) if act else x, w, bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, act: bool = False,
               input_scale: torch.Tensor | None = None, activations: str = "dynamic",
               ) -> torch.Tensor:
    """``F.linear(silu_and_mul(x) if act else x, dequant(weight), bias)`` for a CUDA ``x``
    ``[M, K]`` and float8 ``weight`` ``[N, K]`` with float32 ``weight_scale`` ``[N]``:
    the fastest measured path for one row, the float8 tensor cores for more (or the
    dequantized weights when ``activations`` is ``none`` or a size is not a multiple of
    16)."""
    n, k = weight.shape
    if activations == "none" or n % 16 or k % 16:  # float8 tensor cores: multiples of 16
        matmul = lambda w: _weight_only(x, w, weight_scale, bias, act)  # noqa: E731
    else:
        matmul = lambda w: scaled_mm(x, w, weight_scale, bias, act, input_scale)  # noqa: E731
    if x.shape[0] == 1 and x.is_contiguous() and lin.gemv_enabled():
        key = (tuple(weight.shape), weight.dtype, bias is not None, act, activations)
        if key not in lin._CHOICE and not torch.cuda.is_current_stream_capturing():
            lin._CHOICE[key] = lin.choose_gemv(x, weight, bias, act, matmul, weight_scale)
        cfg = lin._CHOICE.get(key)
        if cfg is not None:
            return lin.gemv(x, weight, bias, act, cfg, scale=weight_scale)
    return matmul(weight)
