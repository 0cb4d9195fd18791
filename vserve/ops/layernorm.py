"""RMSNorm and fused residual-add + RMSNorm in Triton: one pass over each row.

Numerics follow HF's ``LlamaRMSNorm``: the residual sum is rounded to the activations' dtype
(as HF's ``residual + hidden`` is), the statistics are float32, the normalized row is rounded
to the activations' dtype before the weight multiply, and the product is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vserve.ops import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, s_x0, s_x1, r_ptr, s_r, w_ptr, out_ptr, s_o0, s_o1,
    N, eps, NUM_SUB, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    r0 = (row // NUM_SUB).to(tl.int64)
    r1 = (row % NUM_SUB).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + r0 * s_x0 + r1 * s_x1 + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(r_ptr + r0 * s_r + offs, mask=mask, other=0.0)
        xs = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(r_ptr + r0 * s_r + offs, xs, mask=mask)
        xf = xs.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r0 * s_o0 + r1 * s_o1 + offs, out, mask=mask)


def _launch(x, residual, weight, eps, out):
    n = x.shape[-1]
    assert x.stride(-1) == 1 and out.stride(-1) == 1
    if x.dim() == 3:
        rows, sub = x.shape[0], x.shape[1]
        sx0, sx1, so0, so1 = x.stride(0), x.stride(1), out.stride(0), out.stride(1)
    else:
        x2 = x.reshape(-1, n) if x.dim() != 2 else x
        rows, sub = x2.shape[0], 1
        sx0, sx1, so0, so1 = x2.stride(0), 0, out.reshape(-1, n).stride(0), 0
        x = x2
    if rows * sub == 0:
        return
    block = triton.next_power_of_2(n)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
    _rms_norm_kernel[(rows * sub,)](
        x, sx0, sx1, residual if residual is not None else x,
        residual.stride(0) if residual is not None else 0, weight, out, so0, so1,
        n, eps, sub, BLOCK=block, HAS_RES=residual is not None, PDL=pdl(), num_warps=warps,
        launch_pdl=pdl(),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dimension of a 2-D or 3-D ``x`` (any leading
    strides, contiguous last dimension); returns a new contiguous tensor."""
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x) if weight.dtype != x.dtype
                      else x.dtype, device=x.device)
    _launch(x, None, weight, eps, out)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``residual <- x + residual``; ``x <- rms_norm(residual)``. Returns
    ``(x, residual)``. Both are ``[T, N]`` with a contiguous last dimension."""
    assert x.dim() == 2 and residual.shape == x.shape and residual.stride(-1) == 1
    _launch(x, residual, weight, eps, x)
    return x, residual
