"""Sampling on the GPU: two-stage row-wise argmax, plain (greedy) or over Gumbel-perturbed
scores (``gumbel_argmax``, see ``vserve.worker.gumbel``).

``torch.argmax`` over one 128k-vocabulary row runs as a single reduction of a few blocks
(~28 us on an H100); splitting each row over many programs and reducing the partial maxima
takes a few microseconds. Ties resolve to the lowest index, as ``torch.argmax`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vserve.ops import pdl

_BLOCK = 2048


@triton.jit
def _argmax_partial_kernel(x_ptr, s_x, vals_ptr, idx_ptr, V, NUM_BLOCKS, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * s_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    # The first column holding the maximum.
    i = tl.min(tl.where(x == m, cols, 2147483647), 0)
    tl.store(vals_ptr + row * NUM_BLOCKS + b, m)
    tl.store(idx_ptr + row * NUM_BLOCKS + b, i)


@triton.jit
def _argmax_final_kernel(vals_ptr, idx_ptr, out_ptr, NUM_BLOCKS, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK)
    mask = b < NUM_BLOCKS
    v = tl.load(vals_ptr + row * NUM_BLOCKS + b, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * NUM_BLOCKS + b, mask=mask, other=2147483647)
    m = tl.max(v, 0)
    tl.store(out_ptr + row,
             tl.min(tl.where(v == m, i, 2147483647), 0).to(out_ptr.dtype.element_ty))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise argmax of a ``[B, V]`` tensor (last dimension contiguous) → int64 ``[B]``,
    or into ``out`` (``[B]``, int32 or int64, contiguous)."""
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (rows,) and out.is_contiguous()
    if rows == 0:
        return out
    assert logits.stride(1) == 1
    nb = triton.cdiv(vocab, _BLOCK)
    vals = torch.empty((rows, nb), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, nb), dtype=torch.int32, device=logits.device)
    _argmax_partial_kernel[(rows, nb)](logits, logits.stride(0), vals, idx, vocab, nb,
                                       BLOCK=_BLOCK, PDL=pdl(), num_warps=8,
                                       launch_pdl=pdl())
    _argmax_final_kernel[(rows,)](vals, idx, out, nb, BLOCK=triton.next_power_of_2(nb),
                                  PDL=pdl(), num_warps=4, launch_pdl=pdl())
    return out


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_partial_kernel(x_ptr, s_x, temp_ptr, key_ptr, words_ptr, mask_row_ptr,
                                  vals_ptr, idx_ptr, V, W, NUM_BLOCKS, BLOCK: tl.constexpr,
                                  MASKED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * s_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    t = tl.load(temp_ptr + row)
    key = tl.load(key_ptr + row)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = _mix32(_mix32(cols.to(tl.uint32) ^ k0) ^ k1)
    u = ((h >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08  # 2^-24
    g = -tl.log(-tl.log(u))
    s = tl.where(t > 0, x / tl.where(t > 0, t, 1.0) + g, x)
    if MASKED:
        # A row without a bitmask (-1) reads no word: all bits set, every token allowed.
        mrow = tl.load(mask_row_ptr + row).to(tl.int64)
        words = tl.load(words_ptr + mrow * W + cols // 32, mask=(cols < V) & (mrow >= 0),
                        other=-1)
        s = tl.where(((words >> (cols % 32)) & 1) != 0, s, float("-inf"))
    m = tl.max(s, 0)
    i = tl.min(tl.where(s == m, cols, 2147483647), 0)
    tl.store(vals_ptr + row * NUM_BLOCKS + b, m)
    tl.store(idx_ptr + row * NUM_BLOCKS + b, i)


def gumbel_argmax(x: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
                  masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``vserve.worker.gumbel.gumbel_argmax`` in two launches: the noise is computed in
    registers from the row's key and the token id, never stored."""
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    assert x.stride(1) == 1 and temperature.dtype == torch.float32
    assert keys.dtype == torch.int64
    nb = triton.cdiv(vocab, _BLOCK)
    vals = torch.empty((rows, nb), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, nb), dtype=torch.int32, device=x.device)
    words, mask_row = masks if masks is not None else (keys, keys)  # unread when unmasked
    if masks is not None:
        assert words.dtype == torch.int32 and words.is_contiguous()
        assert mask_row.dtype == torch.int32
    _gumbel_argmax_partial_kernel[(rows, nb)](
        x, x.stride(0), temperature, keys, words, mask_row, vals, idx, vocab,
        words.shape[1] if masks is not None else 0, nb, BLOCK=_BLOCK,
        MASKED=masks is not None, num_warps=8)
    _argmax_final_kernel[(rows,)](vals, idx, out, nb, BLOCK=triton.next_power_of_2(nb),
                                  PDL=False, num_warps=4)
    return out
