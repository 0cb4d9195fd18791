"""Triton kernels for attention over the paged KV cache.

Layout (see :mod:`vserve.attention.backend`): ``k_cache``/``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``.

Three kernels:

* ``_rope_cache_kernel``: one program per token. Optionally rotates q (in place) and k by
  RoPE, then writes k and v into the cache at the token's slot (slot < 0: not written).
* ``_decode_kernel``: one program per (sequence, KV head), for steps where every sequence
  has one new token. The program owns the GQA group of query heads of its KV head, rotates
  q and the new k (optionally), writes the new k/v into the cache, starts its online
  softmax from the new token (held in registers) and then walks the cached context
  ``0 .. seq_len - 2`` through the block table, ``BLOCK_N`` tokens at a time. One launch per
  layer does RoPE, the cache write and attention. When the batch is too small to fill the
  GPU (few sequences × KV heads), the context is split over ``NUM_SPLITS`` programs
  (flash-decoding) whose partial softmax states ``_decode_reduce_kernel`` combines.
* ``_prefill_kernel``: one program per (query tile, query head, sequence) of a varlen batch
  whose new tokens may continue a cached prefix (chunked prefill, prefix-cache hits): query
  row ``i`` of a sequence of ``q_len`` new tokens and ``seq_len`` total sits at position
  ``seq_len - q_len + i`` and sees cache positions ``0 ..`` that position; keys and values
  all come from the cache (the new ones were written by ``_rope_cache_kernel`` first).

Heads are handled as two halves (``x[:D/2]``, ``x[D/2:]``), which is what rotate-half RoPE
needs and costs nothing for the dot products (``q·k = q1·k1 + q2·k2``). Scores and the
softmax are float32; ``P @ V`` runs in q's dtype with float32 accumulation. Float32 inputs
use IEEE float32 dot products (no TF32), so the float32 path is float32-accurate. A float8
cache (``--kv-cache-dtype fp8``) is written clamped and rounded, and widened to q's dtype as
each tile loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vserve.ops import pdl, tiles

_LOG2E = 1.4426950408889634


#: A listed prefill tile is ``seq << TILE_SHIFT | tile index`` (``vserve.ops.tiles``).
TILE_SHIFT: tl.constexpr = tl.constexpr(tiles.TILE_SHIFT)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def _rotate(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _cache_value(x, inv_scale, FP8: tl.constexpr):
    """``x`` ready for a store into the cache: a float8 cache holds values divided by their
    scale (times ``inv_scale``) and clamped to e4m3's range
    (``vserve.attention.backend.to_cache_dtype``)."""
    if FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0)
    return x


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    kc_ptr, vc_ptr, sc_b, sc_s, sc_h,
    slot_ptr, pos_ptr, cos_ptr, sin_ptr, s_rope, k_inv, v_inv,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_DH: tl.constexpr,
    PAGE: tl.constexpr, ROPE: tl.constexpr, KV_FP8: tl.constexpr,
    ROW_START_IN_MEM: tl.constexpr, row_start_ptr,
):
    t = tl.program_id(0).to(tl.int64)
    if ROW_START_IN_MEM:
        # A graph of mixed steps: rows before ``row_start[0]`` are the decode kernel's.
        if t < tl.load(row_start_ptr):
            return
    dh = tl.arange(0, BLOCK_DH)
    dmask = dh < HALF
    hk = tl.arange(0, BLOCK_HK)
    kmask = (hk < NUM_KV_HEADS)[:, None] & dmask[None, :]
    k_off = t * sk_t + hk[:, None] * sk_h + dh[None, :]
    k1 = tl.load(k_ptr + k_off, mask=kmask, other=0.0)
    k2 = tl.load(k_ptr + k_off + HALF, mask=kmask, other=0.0)
    if ROPE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        # cos/sin rounded to the activations' dtype first, as HF does.
        cos = tl.load(cos_ptr + pos * s_rope + dh, mask=dmask, other=0.0)
        sin = tl.load(sin_ptr + pos * s_rope + dh, mask=dmask, other=0.0)
        cos = cos.to(k1.dtype).to(tl.float32)[None, :]
        sin = sin.to(k1.dtype).to(tl.float32)[None, :]
        h = tl.arange(0, BLOCK_H)
        qmask = (h < NUM_HEADS)[:, None] & dmask[None, :]
        q_off = t * sq_t + h[:, None] * sq_h + dh[None, :]
        q1 = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
        q2 = tl.load(q_ptr + q_off + HALF, mask=qmask, other=0.0)
        r1, r2 = _rotate(q1.to(tl.float32), q2.to(tl.float32), cos, sin)
        tl.store(q_ptr + q_off, r1.to(q1.dtype), mask=qmask)
        tl.store(q_ptr + q_off + HALF, r2.to(q1.dtype), mask=qmask)
        r1, r2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
        k1 = r1.to(k1.dtype)
        k2 = r2.to(k2.dtype)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        c_off = (slot // PAGE) * sc_b + (slot % PAGE) * sc_s + hk[:, None] * sc_h + dh[None, :]
        kty = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + c_off, _cache_value(k1, k_inv, KV_FP8).to(kty), mask=kmask)
        tl.store(kc_ptr + c_off + HALF, _cache_value(k2, k_inv, KV_FP8).to(kty), mask=kmask)
        v_off = t * sv_t + hk[:, None] * sv_h + dh[None, :]
        v1 = tl.load(v_ptr + v_off, mask=kmask, other=0.0)
        v2 = tl.load(v_ptr + v_off + HALF, mask=kmask, other=0.0)
        tl.store(vc_ptr + c_off, _cache_value(v1, v_inv, KV_FP8).to(kty), mask=kmask)
        tl.store(vc_ptr + c_off + HALF, _cache_value(v2, v_inv, KV_FP8).to(kty), mask=kmask)


# The block table's row stride changes with the longest sequence of an eager step: not
# specialized on, so it never causes a recompilation.
@triton.jit(do_not_specialize=["s_bt"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
    kc_ptr, vc_ptr, sc_b, sc_s, sc_h,
    bt_ptr, s_bt, bt_stride_ptr, seq_lens_ptr, slot_ptr,
    pos_ptr, cos_ptr, sin_ptr, s_rope,
    out_ptr, so_t, so_h,
    part_ptr, ml_ptr,  # split-KV partials: [S, H, NUM_SPLITS, D] acc and [S, H, NUM_SPLITS, 2]
    qk_scale,  # softmax scale * log2(e) (* k_scale: scores are taken over the stored keys)
    k_inv, v_inv, v_scale,  # a float8 cache's: 1 / k_scale, 1 / v_scale, v_scale
    GROUP: tl.constexpr, HALF: tl.constexpr, NUM_HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BT_STRIDE_IN_MEM: tl.constexpr, PDL: tl.constexpr,
    ROWS_IN_MEM: tl.constexpr, rows_ptr,
):
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ROWS_IN_MEM:
        # A graph of mixed steps: only the first ``rows[0]`` rows are one-token sequences.
        if s >= tl.load(rows_ptr):
            return
    if BT_STRIDE_IN_MEM:
        # CUDA graphs: the block table is packed [bs, width] with width changing per step.
        s_bt = tl.load(bt_stride_ptr)
    g = tl.arange(0, BLOCK_G)
    dh = tl.arange(0, BLOCK_DH)
    dmask = dh < HALF
    gmask = g < GROUP
    qmask = gmask[:, None] & dmask[None, :]
    heads = kvh * GROUP + g

    q_off = s * sq_t + heads[:, None] * sq_h + dh[None, :]
    q1 = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    q2 = tl.load(q_ptr + q_off + HALF, mask=qmask, other=0.0)
    k_off = s * sk_t + kvh * sk_h + dh
    k1 = tl.load(k_ptr + k_off, mask=dmask, other=0.0)
    k2 = tl.load(k_ptr + k_off + HALF, mask=dmask, other=0.0)
    v_off = s * sv_t + kvh * sv_h + dh
    v1 = tl.load(v_ptr + v_off, mask=dmask, other=0.0)
    v2 = tl.load(v_ptr + v_off + HALF, mask=dmask, other=0.0)
    dtype = q_ptr.dtype.element_ty  # of the arithmetic; the cache's may be narrower
    cache_ty = kc_ptr.dtype.element_ty
    if ROPE:
        pos = tl.load(pos_ptr + s).to(tl.int64)
        cos = tl.load(cos_ptr + pos * s_rope + dh, mask=dmask, other=0.0)
        sin = tl.load(sin_ptr + pos * s_rope + dh, mask=dmask, other=0.0)
        cos = cos.to(q1.dtype).to(tl.float32)
        sin = sin.to(q1.dtype).to(tl.float32)
        r1, r2 = _rotate(q1.to(tl.float32), q2.to(tl.float32), cos[None, :], sin[None, :])
        q1 = r1.to(q1.dtype)
        q2 = r2.to(q2.dtype)
        r1, r2 = _rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
        k1 = r1.to(k1.dtype)
        k2 = r2.to(k2.dtype)
    # As stored: the new token's own key and value are the cache's (rounded) ones.
    k1 = _cache_value(k1, k_inv, KV_FP8).to(cache_ty)
    k2 = _cache_value(k2, k_inv, KV_FP8).to(cache_ty)
    v1 = _cache_value(v1, v_inv, KV_FP8).to(cache_ty)
    v2 = _cache_value(v2, v_inv, KV_FP8).to(cache_ty)

    # The new token (split 0 only): into the cache, and the first term of the online
    # softmax. Other splits start empty; each of them sees at least one valid column in its
    # first tile (or runs no tile at all), so the running max is finite where it is used.
    first = split == 0
    slot = tl.load(slot_ptr + s).to(tl.int64)
    if (split == 0) & (slot >= 0):
        c_off = (slot // PAGE) * sc_b + (slot % PAGE) * sc_s + kvh * sc_h + dh
        tl.store(kc_ptr + c_off, k1, mask=dmask)
        tl.store(kc_ptr + c_off + HALF, k2, mask=dmask)
        tl.store(vc_ptr + c_off, v1, mask=dmask)
        tl.store(vc_ptr + c_off + HALF, v2, mask=dmask)
    k1 = k1.to(dtype)
    k2 = k2.to(dtype)
    v1 = v1.to(dtype)
    v2 = v2.to(dtype)
    s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1)
             + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)) * qk_scale
    m_i = tl.where(first, s_new, float("-inf"))
    l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    w0 = tl.where(first, 1.0, 0.0)
    acc1 = tl.zeros([BLOCK_G, BLOCK_DH], tl.float32) + (v1.to(tl.float32) * w0)[None, :]
    acc2 = tl.zeros([BLOCK_G, BLOCK_DH], tl.float32) + (v2.to(tl.float32) * w0)[None, :]

    ctx = tl.load(seq_lens_ptr + s) - 1  # cached tokens before the new one
    lo = 0
    hi = ctx
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = lo + chunk
        if hi > ctx:
            hi = ctx
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + s * s_bt
    for start in range(lo, hi, BLOCK_N):
        j = start + n
        jmask = j < hi
        blk = tl.load(bt_row + j // PAGE, mask=jmask, other=0).to(tl.int64)
        c_off = blk * sc_b + (j % PAGE) * sc_s + kvh * sc_h
        tmask = jmask[:, None] & dmask[None, :]
        kt1 = tl.load(kc_ptr + c_off[:, None] + dh[None, :], mask=tmask, other=0.0).to(dtype)
        kt2 = tl.load(kc_ptr + c_off[:, None] + dh[None, :] + HALF, mask=tmask,
                      other=0.0).to(dtype)
        # V is loaded with K, not after the scores: one memory round trip per tile, not two
        # (a short context is one tile per program, so this is most of the latency).
        vt1 = tl.load(vc_ptr + c_off[:, None] + dh[None, :], mask=tmask, other=0.0).to(dtype)
        vt2 = tl.load(vc_ptr + c_off[:, None] + dh[None, :] + HALF, mask=tmask,
                      other=0.0).to(dtype)
        sc = tl.dot(q1, tl.trans(kt1), input_precision=PRECISION)
        sc = tl.dot(q2, tl.trans(kt2), acc=sc, input_precision=PRECISION)
        sc = tl.where(jmask[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(dtype)
        acc1 = tl.dot(pd, vt1, acc=acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(pd, vt2, acc=acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    if KV_FP8:  # the stored values, times their scale (a linear map: once, at the end)
        acc1 = acc1 * v_scale
        acc2 = acc2 * v_scale
    if NUM_SPLITS == 1:
        o_off = s * so_t + heads[:, None] * so_h + dh[None, :]
        inv = 1.0 / l_i
        tl.store(out_ptr + o_off, (acc1 * inv[:, None]).to(out_ptr.dtype.element_ty),
                 mask=qmask)
        tl.store(out_ptr + o_off + HALF, (acc2 * inv[:, None]).to(out_ptr.dtype.element_ty),
                 mask=qmask)
    else:
        row = (s * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
        p_off = row[:, None] * (2 * HALF) + dh[None, :]
        tl.store(part_ptr + p_off, acc1, mask=qmask)
        tl.store(part_ptr + p_off + HALF, acc2, mask=qmask)
        tl.store(ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, ml_ptr, out_ptr, so_t, so_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """Combine the split-KV partials of one (sequence, head)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    row = (s * NUM_HEADS + h) * NUM_SPLITS + sp
    m = tl.load(ml_ptr + row * 2)
    lsum = tl.load(ml_ptr + row * 2 + 1)
    m_max = tl.max(m, 0)  # finite: split 0 holds the new token
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    dmask = d < HEAD_DIM
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=dmask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + s * so_t + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit(do_not_specialize=["s_bt"])
def _prefill_kernel(
    q_ptr, sq_t, sq_h,
    kc_ptr, vc_ptr, sc_b, sc_s, sc_h,
    bt_ptr, s_bt, bt_stride_ptr, seq_lens_ptr, qsl_ptr, tiles_ptr,
    out_ptr, so_t, so_h,
    qk_scale, v_scale,  # as the decode kernel's (a float8 cache's scales folded in)
    GROUP: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
    PAGE: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    TILED: tl.constexpr, BT_STRIDE_IN_MEM: tl.constexpr,
):
    h = tl.program_id(1)
    if TILED:
        # A fixed grid (CUDA graphs of mixed steps): program i takes the query tile the
        # host listed at ``tiles[i]`` as ``seq << TILE_SHIFT | tile``; -1 pads the list.
        packed = tl.load(tiles_ptr + tl.program_id(0))
        if packed < 0:
            return
        s = (packed >> TILE_SHIFT).to(tl.int64)
        mb = packed & ((1 << TILE_SHIFT) - 1)
    else:
        mb = tl.program_id(0)
        s = tl.program_id(2).to(tl.int64)
    if BT_STRIDE_IN_MEM:
        s_bt = tl.load(bt_stride_ptr)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx = seq_len - q_len
    kvh = h // GROUP
    dtype = q_ptr.dtype.element_ty  # of the arithmetic; the cache's may be narrower

    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < q_len
    dh = tl.arange(0, BLOCK_DH)
    dmask = dh < HALF
    qmask = imask[:, None] & dmask[None, :]
    rows = (q_start + i).to(tl.int64)
    q_off = rows[:, None] * sq_t + h * sq_h + dh[None, :]
    q1 = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(dtype)
    q2 = tl.load(q_ptr + q_off + HALF, mask=qmask, other=0.0).to(dtype)
    qpos = ctx + i

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)

    end = ctx + (mb + 1) * BLOCK_M
    if end > seq_len:
        end = seq_len
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + s * s_bt
    for start in range(0, end, BLOCK_N):
        j = start + n
        jmask = j < end
        blk = tl.load(bt_row + j // PAGE, mask=jmask, other=0).to(tl.int64)
        c_off = blk * sc_b + (j % PAGE) * sc_s + kvh * sc_h
        tmask = jmask[:, None] & dmask[None, :]
        kt1 = tl.load(kc_ptr + c_off[:, None] + dh[None, :], mask=tmask, other=0.0).to(dtype)
        kt2 = tl.load(kc_ptr + c_off[:, None] + dh[None, :] + HALF, mask=tmask,
                      other=0.0).to(dtype)
        sc = tl.dot(q1, tl.trans(kt1), input_precision=PRECISION)
        sc = tl.dot(q2, tl.trans(kt2), acc=sc, input_precision=PRECISION)
        visible = jmask[None, :] & (j[None, :] <= qpos[:, None])
        sc = tl.where(visible, sc * qk_scale, float("-inf"))
        # Column 0 is visible to every row, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt1 = tl.load(vc_ptr + c_off[:, None] + dh[None, :], mask=tmask, other=0.0).to(dtype)
        vt2 = tl.load(vc_ptr + c_off[:, None] + dh[None, :] + HALF, mask=tmask,
                      other=0.0).to(dtype)
        pd = p.to(dtype)
        acc1 = tl.dot(pd, vt1, acc=acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(pd, vt2, acc=acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    inv = 1.0 / l_i
    if KV_FP8:
        inv = inv * v_scale
    o_off = rows[:, None] * so_t + h * so_h + dh[None, :]
    tl.store(out_ptr + o_off, (acc1 * inv[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
    tl.store(out_ptr + o_off + HALF, (acc2 * inv[:, None]).to(out_ptr.dtype.element_ty),
             mask=qmask)


# ---- launchers ------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def _scales(cache: torch.Tensor, kv_scales: tuple[float, float]) -> tuple[float, float]:
    """The scales a cache applies: a float8 cache's own, 1 for a 16/32-bit cache (which
    stores values as they are, so scaled scores or outputs would be wrong)."""
    return kv_scales if _is_fp8(cache) else (1.0, 1.0)


def _check_head(x: torch.Tensor, name: str) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor | None = None,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
    row_start: torch.Tensor | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Rotate ``q`` in place and ``k`` (when ``positions`` is given), then write k and v into
    the cache at ``slot_mapping`` (negative slots are skipped). ``q``/``k``/``v`` are
    ``[T, heads, head_dim]`` views (any row/head strides, contiguous last dimension).
    ``row_start`` (a one-element int32 device tensor): rows before it are left untouched.
    ``kv_scales``: a float8 cache's ``(k_scale, v_scale)``; values are stored divided by
    them."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    ks, vs = _scales(k_cache, kv_scales)
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache)):
        _check_head(x, name)
    half = head_dim // 2
    rope = positions is not None
    if rope:
        assert cos_cache is not None and sin_cache is not None
        cos, sin, pos = cos_cache, sin_cache, positions
    else:
        cos = sin = k_cache  # unused pointers
        pos = slot_mapping
    _rope_cache_kernel[(num_tokens,)](
        q, k, v,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        slot_mapping, pos, cos, sin, cos.stride(0), 1.0 / ks, 1.0 / vs,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_DH=triton.next_power_of_2(half), PAGE=k_cache.shape[1], ROPE=rope,
        KV_FP8=_is_fp8(k_cache), ROW_START_IN_MEM=row_start is not None,
        row_start_ptr=row_start if row_start is not None else slot_mapping,
        num_warps=4 if num_heads * head_dim >= 2048 else 1,
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    positions: torch.Tensor | None = None,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
    num_splits: int | None = None,
    bt_stride: torch.Tensor | None = None,
    num_rows: torch.Tensor | None = None,
    tuning: tuple[int, int, int] | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """One new token per sequence (row ``s`` of q/k/v is sequence ``s``): RoPE (when
    ``positions`` is given), cache write, and attention over ``seq_lens[s]`` tokens.

    ``bt_stride``: a one-element int32 device tensor holding the block table's row stride,
    read by the kernel instead of ``block_tables.stride(0)`` (CUDA graphs replay over a
    packed table whose width changes from step to step).

    ``num_rows`` (a one-element int32 device tensor; needs ``num_splits=1``): only rows
    ``0 .. num_rows[0] - 1`` are one-token sequences; programs of later rows do nothing (a
    CUDA graph of mixed steps, whose other rows are prompt chunks).

    ``tuning``: ``(BLOCK_N, num_warps, num_stages)`` instead of the defaults
    (``benchmarks/decode_attention.py`` sweeps them). ``kv_scales``: as in
    ``rope_and_cache``."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_seqs == 0:
        return out
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("out", out)):
        _check_head(x, name)
    group = num_heads // num_kv_heads
    half = head_dim // 2
    rope = positions is not None
    if rope:
        assert cos_cache is not None and sin_cache is not None
        cos, sin, pos = cos_cache, sin_cache, positions
    else:
        cos = sin = k_cache
        pos = seq_lens
    ks, vs = _scales(k_cache, kv_scales)
    fp32 = q.dtype == torch.float32
    block_n, warps, stages = tuning or (32 if fp32 else 64, 4, 2)
    if num_splits is None:
        num_splits = decode_splits(num_seqs, num_kv_heads, q.device)
    assert num_rows is None or num_splits == 1
    if num_splits > 1:
        part = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32,
                           device=q.device)
        ml = torch.empty((num_seqs, num_heads, num_splits, 2), dtype=torch.float32,
                         device=q.device)
    else:
        part = ml = out
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k, v,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0),
        bt_stride if bt_stride is not None else seq_lens, seq_lens, slot_mapping,
        pos, cos, sin, cos.stride(0),
        out, out.stride(0), out.stride(1),
        part, ml,
        scale * _LOG2E * ks, 1.0 / ks, 1.0 / vs, vs,
        GROUP=group, HALF=half, NUM_HEADS=num_heads,
        BLOCK_G=_pow2(group), BLOCK_DH=_pow2(half), BLOCK_N=block_n,
        PAGE=k_cache.shape[1], ROPE=rope, PRECISION=_precision(q.dtype),
        KV_FP8=_is_fp8(k_cache), NUM_SPLITS=num_splits,
        BT_STRIDE_IN_MEM=bt_stride is not None, PDL=pdl(),
        ROWS_IN_MEM=num_rows is not None,
        rows_ptr=num_rows if num_rows is not None else seq_lens,
        num_warps=warps, num_stages=stages, launch_pdl=pdl(),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part, ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            NUM_SPLITS=num_splits, PDL=pdl(), num_warps=1, launch_pdl=pdl(),
        )
    return out


_SM_COUNT: dict[int, int] = {}


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split-KV factor (a power of two, at most 16) so that a decode step of few sequences
    still puts about two programs on every multiprocessor; 1 for large batches."""
    if device.type != "cuda":
        return 1 if num_seqs * num_kv_heads >= 8 else 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(index)
    if sms is None:
        sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    programs = num_seqs * num_kv_heads
    splits = 1
    while splits < 16 and programs * splits < 2 * sms:
        splits *= 2
    return splits


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    tile_list: torch.Tensor | None = None,
    bt_stride: torch.Tensor | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal attention of each sequence's new rows over its whole (cached) context; the
    new tokens' k/v must already be in the cache.

    ``tile_list`` (int32, from ``vserve.ops.tiles.prefill_tiles`` with ``prefill_block_m``
    rows per tile, padded with -1) fixes the grid to one program per entry and head, whatever the step holds:
    that is how a CUDA graph replays it. ``bt_stride`` and ``kv_scales`` as in
    ``decode_attention``."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    _check_head(q, "q")
    _check_head(out, "out")
    num_kv_heads = k_cache.shape[2]
    half = head_dim // 2
    ks, vs = _scales(k_cache, kv_scales)
    fp32 = q.dtype == torch.float32
    block_dh = _pow2(half)
    block_m = tiles.prefill_block_m(q.dtype, head_dim)
    block_n = 32 if fp32 or block_dh > 64 else 64
    if tile_list is not None:
        grid: tuple[int, ...] = (tile_list.shape[0], num_heads)
    else:
        if max_query_len <= 16:
            block_m = 16
        grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables, block_tables.stride(0),
        bt_stride if bt_stride is not None else seq_lens, seq_lens, query_start_loc,
        tile_list if tile_list is not None else seq_lens,
        out, out.stride(0), out.stride(1),
        scale * _LOG2E * ks, vs,
        GROUP=num_heads // num_kv_heads, HALF=half,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DH=block_dh,
        PAGE=k_cache.shape[1], PRECISION=_precision(q.dtype), KV_FP8=_is_fp8(k_cache),
        TILED=tile_list is not None, BT_STRIDE_IN_MEM=bt_stride is not None,
        num_warps=4, num_stages=2,
    )
    return out
