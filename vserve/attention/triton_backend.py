"""The GPU attention backend: Triton kernels over the paged KV cache.

Same contract as :class:`~vserve.attention.torch_ref.TorchReferenceBackend` (the
oracle it is tested against): write the step's k/v into the cache at ``slot_mapping``, then
attend causally over each sequence's whole context through its block table.

* Pure decode steps (every sequence has one new token) take one kernel per layer
  (``vserve.ops.attention.decode_attention``): the cache write and the attention of a
  (sequence, KV head) happen in one program, which also serves the GQA group's query heads.
  This path reads nothing from the host copies of the metadata, so it can be captured in a
  CUDA graph and replayed over persistent metadata buffers (``supports_decode_graphs``; the
  block table's row stride is read from ``metadata.block_table_stride`` when set).
* Other steps (prefill, chunked prefill, prefix-cache hits, mixed batches) write the cache
  first (one kernel) and then run the varlen prefill kernel over the paged context. Its grid
  is fixed by ``metadata.prefill_tiles`` when set, which is how the CUDA graphs of mixed
  steps (``vserve.worker.mixed_graphs``) replay it.

``forward_rope`` is the fused entry the model uses on the GPU (``fuses_rope``): it applies
RoPE to q and k inside the same kernels (q in place), so no separate rotary pass runs.
"""

from __future__ import annotations

import torch

from vserve.attention.backend import AttentionBackend, AttentionMetadata
from vserve.ops import attention as ops


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fuses_rope = True
    supports_decode_graphs = True

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
        return self._run(q, k, v, k_cache, v_cache, metadata, scale, out, None, None, None,
                         k_scale, v_scale)

    def forward_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        return self._run(q, k, v, k_cache, v_cache, metadata, scale, out, positions,
                         cos_cache, sin_cache, k_scale, v_scale)

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
             out: torch.Tensor | None, positions: torch.Tensor | None,
             cos: torch.Tensor | None, sin: torch.Tensor | None, k_scale: float,
             v_scale: float) -> torch.Tensor:
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.dtype != k_cache.dtype and k_cache.dtype != torch.float8_e4m3fn:
            # A 16/32-bit cache sets the arithmetic's dtype; a float8 one is only storage.
            q, k, v = q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype)
        kv_scales = (k_scale, v_scale)  # the kernels apply them to a float8 cache only
        if metadata.max_query_len == 1 and q.shape[0] == metadata.seq_lens.shape[0]:
            return ops.decode_attention(
                q, k, v, k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
                metadata.slot_mapping, scale, out, positions, cos, sin,
                bt_stride=metadata.block_table_stride, kv_scales=kv_scales,
            )
        rows = metadata.num_decode_rows
        if rows is not None:
            # A graph of mixed steps: the leading one-token rows take the decode kernel (one
            # program per KV head serves its query group), the prompt rows the tiled one.
            n = metadata.seq_lens.shape[0]
            ops.decode_attention(
                q[:n], k[:n], v[:n], k_cache, v_cache, metadata.block_tables,
                metadata.seq_lens, metadata.slot_mapping, scale, out[:n], positions, cos, sin,
                num_splits=1, bt_stride=metadata.block_table_stride, num_rows=rows,
                kv_scales=kv_scales)
        ops.rope_and_cache(q, k, v, k_cache, v_cache, metadata.slot_mapping, positions, cos, sin,
                           row_start=rows, kv_scales=kv_scales)
        return ops.prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
            metadata.query_start_loc, metadata.max_query_len, scale, out,
            tile_list=metadata.prefill_tiles, bt_stride=metadata.block_table_stride,
            kv_scales=kv_scales,
        )
