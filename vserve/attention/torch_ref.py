"""The reference attention backend: plain PyTorch, one sequence at a time.

Clear rather than fast: it is the correctness oracle that optimized kernels are tested
against, and the CPU path. Per sequence it gathers the context's keys and values through the
block table into a dense ``[seq_len, kv_heads, head_dim]`` tensor and calls
``scaled_dot_product_attention`` with an explicit bottom-right-aligned causal mask; a
sequence with one new token (decode) takes two float32 batched matmuls and a softmax instead.

Prompt rows compute in the inputs' dtype (no upcast), like HF's SDPA path; decode rows in
float32, as the CPU flash kernel accumulates. Float32 inputs give float32-accurate results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vserve.attention.backend import AttentionBackend, AttentionMetadata, to_cache_dtype


class TorchReferenceBackend(AttentionBackend):
    """Paged causal attention with ``torch.nn.functional.scaled_dot_product_attention``.

    Preconditions (from :mod:`vserve.attention.backend`): every entry of
    ``slot_mapping`` is a valid slot; sequence ``s``'s block table covers ``seq_lens[s]``
    tokens; positions ``0 .. seq_lens[s] - 1`` of each sequence are in the cache once this
    step's writes are done. Cache slots past ``seq_lens[s]`` may hold anything (tests fill
    them with NaN to prove it): they are not read, or read and masked out.
    """

    name = "torch_ref"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        if k_cache.dtype != torch.float8_e4m3fn:
            k_scale = v_scale = 1.0
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads

        # Write first: a sequence may read blocks another sequence writes in this same step.
        slots = metadata.slot_mapping.long()
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(k, k_cache.dtype,
                                                                          k_scale)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(v, v_cache.dtype,
                                                                          v_scale)

        if out is None:
            out = torch.empty_like(q)
        starts = metadata.query_start_loc_cpu
        lens = metadata.seq_lens_cpu
        decode = [s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
        batched = len(decode) > 1 and (len(decode) * max(lens[s] for s in decode) * num_heads
                                       * head_dim <= _BATCHED_DECODE_ELEMENTS)
        if batched:
            _decode_batch(q, k_cache, v_cache, metadata, decode, scale, out, k_scale, v_scale)
        for s, seq_len in enumerate(lens):
            start, end = starts[s], starts[s + 1]
            q_len = end - start
            if q_len == 0 or (batched and q_len == 1):
                continue
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[s, :num_blocks]
            # [num_blocks, block_size, Hk, D] → the first seq_len tokens, heads first.
            keys = k_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[
                :seq_len].transpose(0, 1)
            values = v_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[
                :seq_len].transpose(0, 1)
            if q_len == 1:
                # Decode: the query row sees every position, so no mask; two batched matmuls
                # over the GQA groups (query head h reads KV head h // group) instead of
                # SDPA, whose CPU path for this case is the math fallback at ~3x the cost.
                # Float32 throughout, as the CPU flash kernel accumulates for 16-bit inputs.
                qg = q[start].view(num_kv_heads, group, head_dim).to(torch.float32)
                scores = torch.matmul(qg, widen(keys, torch.float32, k_scale).transpose(1, 2))
                scores *= scale
                probs = torch.softmax(scores, dim=-1)
                attn = torch.matmul(probs, widen(values, torch.float32, v_scale))
                out[start] = attn.view(num_heads, head_dim)
                continue
            # Query row i sits at position seq_len - q_len + i and sees positions 0..that.
            mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(
                diagonal=seq_len - q_len)
            # enable_gqa: query head h reads KV head h // group, without copying the KV heads.
            attn = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                widen(keys, q.dtype, k_scale),
                widen(values, q.dtype, v_scale),
                attn_mask=mask,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[start:end] = attn.transpose(0, 1)
        return out


#: Every float8 e4m3 value by its bit pattern: widening through this table is exact and
#: about twice as fast on CPUs as torch's conversion (~5 ns per element, against ~0.5 for
#: bfloat16), which a float8 cache pays for every cached key and value of every step.
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()[:, None]


def widen(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Cached keys or values as ``dtype`` for the arithmetic: a float8 cache's times its
    ``scale`` (in float32, then rounded to ``dtype``)."""
    if x.dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    if x.device.type != "cpu":
        return (x.float() * scale).to(dtype) if scale != 1.0 else x.to(dtype)
    table = _FP8_VALUES * scale if scale != 1.0 else _FP8_VALUES
    return F.embedding(x.view(torch.uint8).int(), table).squeeze(-1).to(dtype)


#: Above this many elements (rows × longest context × query heads × head dim) the decode rows
#: of a step are not padded into one batch but attended one by one (bounded memory).
_BATCHED_DECODE_ELEMENTS = 1 << 23


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  metadata: AttentionMetadata, seqs: list[int], scale: float,
                  out: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Attention of the one-token sequences ``seqs`` in one pass: their contexts gathered
    into a ``[B, L, Hk, D]`` batch padded to the longest, positions past each length masked.
    The same float32 arithmetic as the per-sequence decode path, with a cost that does not
    grow with the number of operators per sequence (at batch 64 the loop was ~2,000 ops per
    layer)."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    lens = [metadata.seq_lens_cpu[s] for s in seqs]
    dev = q.device
    rows = torch.tensor([metadata.query_start_loc_cpu[s] for s in seqs], device=dev)
    width = -(-max(lens) // block_size)
    tables = metadata.block_tables[:, :width]
    if len(seqs) != tables.shape[0]:
        tables = tables[torch.tensor(seqs, device=dev)]
    b, length = len(seqs), width * block_size
    # Padding entries of the table are block 0: read, then masked out.
    keys = k_cache.index_select(0, tables.reshape(-1)).view(b, length, num_kv_heads, head_dim)
    values = v_cache.index_select(0, tables.reshape(-1)).view(b, length, num_kv_heads, head_dim)
    qg = q[rows].view(b, num_kv_heads, group, head_dim).to(torch.float32)
    scores = torch.matmul(qg, widen(keys, torch.float32, k_scale).permute(0, 2, 3, 1)) * scale
    pad = (torch.arange(length, device=dev)[None, :]
           >= torch.tensor(lens, device=dev)[:, None])  # [B, L]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's length hold anything (NaN in the tests); a zero weight times
    # NaN is NaN, so the padded values are zeroed, not only weighted by zero.
    values = widen(values, torch.float32, v_scale).masked_fill(pad[:, :, None, None], 0.0)
    attn = torch.matmul(probs, values.permute(0, 2, 1, 3))
    out[rows] = attn.reshape(b, num_heads, head_dim).to(out.dtype)

