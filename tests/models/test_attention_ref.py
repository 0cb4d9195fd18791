"""The reference attention backend against a naive dense causal attention.

Inputs are fresh random numbers each run (the seed is in every failure message); the cache
starts NaN-filled, so a read of a block outside a sequence's table, or of a slot not yet
written, turns the output into NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import make_attn_metadata

from vserve.attention.torch_ref import TorchReferenceBackend

NUM_BLOCKS = 40


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float
) -> torch.Tensor:
    """Dense float64 causal attention for one sequence.

    ``q`` ``[q_len, H, D]`` holds positions ``first_pos ..``; ``k``/``v`` ``[seq_len, Hk, D]``
    the whole context. Query head ``h`` uses KV head ``h // (H // Hk)``.
    """
    q_len, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(num_heads):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(q_len):
            visible = first_pos + i + 1
            scores = (kh[:visible] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(scores, dim=0) @ vh[:visible]
    return out



def run_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    kv_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the backend on ``seqs`` (``(cached, new)`` pairs) after writing the cached part.

    Checks the cache contents afterwards; returns ``(outputs, naive references)`` per seq.
    ``kv_dtype``: a cache narrower than ``dtype`` (float8); the naive references then attend
    over the keys and values as that cache rounds them.
    """
    kv_dtype = kv_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = []
    for ctx, new in seqs:
        need = -(-(ctx + new) // block_size)
        tables.append(order[:need])
        order = order[need:]
    unused = order
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=kv_dtype)
    v_cache = torch.full(shape, float("nan"), dtype=kv_dtype)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen).to(dtype)

    full = [
        (rand(c + n, num_kv_heads, head_dim), rand(c + n, num_kv_heads, head_dim)) for c, n in seqs
    ]
    qs = [rand(n, num_heads, head_dim) for _, n in seqs]
    # As the cache holds them (float8: rounded, clamped; otherwise unchanged).
    stored = [(k.clamp(-448, 448).to(kv_dtype), v.clamp(-448, 448).to(kv_dtype))
              if kv_dtype == torch.float8_e4m3fn else (k, v) for k, v in full]
    # The already-cached context, written position by position (not with the backend's code).
    for (ctx, _), table, (k, v) in zip(seqs, tables, stored, strict=True):
        for p in range(ctx):
            k_cache[table[p // block_size], p % block_size] = k[p]
            v_cache[table[p // block_size], p % block_size] = v[p]

    metadata = make_attn_metadata(seqs, tables, block_size)
    scale = head_dim**-0.5
    out = TorchReferenceBackend().forward(
        torch.cat(qs),
        torch.cat([k[c:] for (c, _), (k, _) in zip(seqs, full, strict=True)]),
        torch.cat([v[c:] for (c, _), (_, v) in zip(seqs, full, strict=True)]),
        k_cache,
        v_cache,
        metadata,
        scale,
    )
    assert out.shape == (sum(n for _, n in seqs), num_heads, head_dim)
    assert out.dtype == dtype

    for (ctx, new), table, (k, v) in zip(seqs, tables, stored, strict=True):
        for p in range(ctx + new):
            b, o = table[p // block_size], p % block_size
            assert torch.equal(k_cache[b, o].float(), k[p].float()), (seed, p)
            assert torch.equal(v_cache[b, o].float(), v[p].float()), (seed, p)
    assert k_cache[unused].float().isnan().all() and v_cache[unused].float().isnan().all(), seed

    refs = [
        naive_attention(q, k.to(dtype), v.to(dtype), ctx, scale)
        for q, (ctx, _), (k, v) in zip(qs, seqs, stored, strict=True)
    ]
    return list(out.split([n for _, n in seqs])), refs


CASES = [
    # heads, kv_heads, head_dim, block_size, [(cached, new), ...]
    pytest.param(4, 4, 16, 4, [(0, 1), (0, 7), (0, 16)], id="mha-prefill-odd-and-boundary"),
    pytest.param(8, 2, 32, 4, [(5, 3), (12, 4), (15, 1), (16, 1)], id="gqa-continuation"),
    pytest.param(6, 1, 8, 16, [(0, 33), (31, 1), (1, 31)], id="mqa-block16"),
    pytest.param(4, 2, 64, 8, [(7, 1), (8, 8), (0, 9), (23, 2)], id="gqa-mixed"),
    # Several one-token rows: attended as one padded batch (lengths on, before and after
    # block boundaries; the padding reads NaN slots of partial blocks and block 0).
    pytest.param(8, 2, 16, 4, [(0, 1), (3, 1), (0, 5), (4, 1), (11, 1), (30, 1)],
                 id="gqa-decode-batch-between-prompts"),
    pytest.param(4, 1, 32, 8, [(c, 1) for c in (0, 7, 8, 9, 23, 40)], id="mqa-decode-batch"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,seqs", CASES)
def test_float32_matches_naive(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seqs: list[tuple[int, int]],
    fresh_seed: int,
) -> None:
    seed = fresh_seed
    outs, refs = run_case(seqs, num_heads, num_kv_heads, head_dim, block_size, torch.float32, seed)
    for (ctx, new), out, ref in zip(seqs, outs, refs, strict=True):
        err = (out.double() - ref).abs().max().item()
        assert err < 5e-6, f"seed={seed} seq=({ctx},{new}) err={err}"


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_decode_rows_batched_or_one_by_one(batched: bool, monkeypatch: pytest.MonkeyPatch,
                                           fresh_seed: int) -> None:
    """Decode rows take the padded batch below a size limit and the per-sequence loop above
    it; both match the naive attention."""
    import vserve.attention.torch_ref as torch_ref

    monkeypatch.setattr(torch_ref, "_BATCHED_DECODE_ELEMENTS", 1 << 30 if batched else 0)
    seqs = [(5, 1), (0, 3), (16, 1), (2, 1), (9, 1)]
    outs, refs = run_case(seqs, 8, 4, 16, 4, torch.float32, fresh_seed)
    for (ctx, new), out, ref in zip(seqs, outs, refs, strict=True):
        err = (out.double() - ref).abs().max().item()
        assert err < 5e-6, f"seed={fresh_seed} seq=({ctx},{new}) err={err}"


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_float8_cache_matches_naive_over_rounded_kv(batched: bool,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    fresh_seed: int) -> None:
    """A float8 cache (``--kv-cache-dtype fp8``): float32 arithmetic over the keys and values
    as float8 rounds them, on every path (prompt rows through SDPA, decode rows batched or one
    by one)."""
    import vserve.attention.torch_ref as torch_ref

    monkeypatch.setattr(torch_ref, "_BATCHED_DECODE_ELEMENTS", 1 << 30 if batched else 0)
    seqs = [(0, 13), (9, 4), (20, 1), (6, 1), (0, 1), (15, 1)]
    outs, refs = run_case(seqs, 8, 2, 32, 4, torch.float32, fresh_seed,
                          kv_dtype=torch.float8_e4m3fn)
    for (ctx, new), out, ref in zip(seqs, outs, refs, strict=True):
        err = (out.double() - ref).abs().max().item()
        assert err < 5e-6, f"seed={fresh_seed} seq=({ctx},{new}) err={err}"


def test_float8_writes_clamp_and_widening_is_exact_for_every_value() -> None:
    from vserve.attention.backend import to_cache_dtype
    from vserve.attention.torch_ref import widen

    big = to_cache_dtype(torch.tensor([1e4, -600.0, 449.0, 0.3]), torch.float8_e4m3fn)
    assert big.float().tolist() == [448.0, -448.0, 448.0, 0.3125]

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got, want = widen(every.view(16, 16).t(), dtype), every.view(16, 16).t().to(dtype)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_bfloat16_close_to_naive(fresh_seed: int) -> None:
    seed = fresh_seed
    seqs = [(0, 13), (9, 4), (20, 1), (6, 1)]
    outs, refs = run_case(seqs, 8, 2, 32, 4, torch.bfloat16, seed)
    for out, ref in zip(outs, refs, strict=True):
        # Outputs are convex combinations of N(0, 1) values; bf16 keeps ~3 digits.
        err = (out.double() - ref).abs().max().item()
        assert err < 5e-2, f"seed={seed} err={err}"


def test_reads_blocks_written_by_another_sequence_in_the_same_step(fresh_seed: int) -> None:
    """Prefix hit inside one step: B's table starts with the blocks A is writing now."""
    seed = fresh_seed
    gen = torch.Generator().manual_seed(seed)
    block_size, heads, kv_heads, dim = 4, 4, 2, 16
    k_cache = torch.full((NUM_BLOCKS, block_size, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k_a, v_a = (
        torch.randn(8, kv_heads, dim, generator=gen),
        torch.randn(8, kv_heads, dim, generator=gen),
    )
    k_b, v_b = (
        torch.randn(3, kv_heads, dim, generator=gen),
        torch.randn(3, kv_heads, dim, generator=gen),
    )
    q_a, q_b = torch.randn(8, heads, dim, generator=gen), torch.randn(3, heads, dim, generator=gen)
    # A prefills 8 tokens into blocks 17, 3; B shares them and adds 3 tokens in block 29.
    metadata = make_attn_metadata([(0, 8), (8, 3)], [[17, 3], [17, 3, 29]], block_size)
    out = TorchReferenceBackend().forward(
        torch.cat([q_a, q_b]),
        torch.cat([k_a, k_b]),
        torch.cat([v_a, v_b]),
        k_cache,
        v_cache,
        metadata,
        dim**-0.5,
    )
    ref_a = naive_attention(q_a, k_a, v_a, 0, dim**-0.5)
    ref_b = naive_attention(q_b, torch.cat([k_a, k_b]), torch.cat([v_a, v_b]), 8, dim**-0.5)
    assert (out[:8].double() - ref_a).abs().max().item() < 5e-6, seed
    assert (out[8:].double() - ref_b).abs().max().item() < 5e-6, seed
