"""The attention backend interface.

A step's tokens form one flat batch: sequence s owns query rows
``query_start_loc[s] : query_start_loc[s+1]``; those rows are the *last* ``q_len`` tokens of
its context of ``seq_lens[s]`` tokens (the earlier ones are already in the paged KV cache,
from an earlier step or a prefix-cache hit). Backends first write the new keys and values
into the cache at ``slot_mapping`` and then attend over the whole context through the block
table, so a sequence may read blocks that another sequence of the same batch writes in the
same layer (n > 1 sharing a prompt, prefix hits inside one step).

KV cache layout per layer: ``k_cache`` and ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives at
block ``block_table[t // block_size]``, offset ``t % block_size``, i.e. flat slot
``block_id * block_size + offset``.

A cache may be stored in a narrower dtype than the activations (``--kv-cache-dtype fp8``):
keys and values are then divided by their layer's scale (``k_scale``/``v_scale``: a
checkpoint's calibrated scales, else 1) and rounded to it as they are written
(:func:`to_cache_dtype`), and widened and multiplied by the scale as they are read, so a
token's own key and value are the rounded ones too, whether a kernel takes them from the
cache or from its registers. The scales mean nothing to a 16/32-bit cache.

Everything the model, the model runner and the CUDA graphs ask of a backend is declared on
:class:`AttentionBackend`: ``forward``, the fused-RoPE entry ``forward_rope`` (with
``fuses_rope`` saying whether to use it) and ``supports_decode_graphs`` (whether pure-decode
steps may be captured and replayed over the graphs' persistent buffers, see
:attr:`AttentionMetadata.block_table_stride`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat slot per new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so that backends needing Python loops never synchronize with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Set by the CUDA graphs, whose block table lives in a capture buffer reused for every
    # table width: a device ``[1]`` int32 holding this step's row width, which a graph-safe
    # decode path reads instead of ``block_tables.stride(0)``. None everywhere else.
    block_table_stride: torch.Tensor | None = None
    # Set by the CUDA graphs of mixed steps: the prefill path's query tiles as a fixed-size
    # int32 list (``vserve.ops.attention.prefill_tiles``, padded with -1), so that its grid
    # does not depend on the step. None everywhere else.
    prefill_tiles: torch.Tensor | None = None
    # With ``prefill_tiles``: a device ``[1]`` int32, the number of leading one-token
    # sequences (rows ``0 .. n-1``, sequences ``0 .. n-1``), which the decode kernel serves;
    # the tiles then list only the later sequences.
    num_decode_rows: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


#: float8 e4m3's largest finite value. A float8 cache stores keys and values divided by
#: their scale (1 without a checkpoint's, vLLM's default), clamped to this range.
FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` as a cache of ``cache_dtype`` stores it: float8 divides by ``scale`` and clamps
    to ``±FP8_MAX`` first, so that every path (torch here, the Triton kernels) stores ±448
    past the range, whatever its own conversion would make of such values (e4m3fn has no
    infinity). Other dtypes ignore ``scale``."""
    if cache_dtype == torch.float8_e4m3fn:
        if scale != 1.0:
            x = x.float() / scale
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(cache_dtype)


class AttentionBackend(ABC):
    """Computes causal attention for a flat batch over the paged KV cache."""

    name: ClassVar[str] = "abstract"
    #: ``forward_rope`` applies RoPE inside the attention kernels. When False the model
    #: rotates q and k itself and calls ``forward``; ``forward_rope`` is never called.
    fuses_rope: ClassVar[bool] = False
    #: A pure-decode ``forward`` (``max_query_len == 1``) reads no host-side metadata (the
    #: ``*_cpu`` lists, ``max_seq_len``) and honours ``metadata.block_table_stride``, so the
    #: model runner may capture it in a CUDA graph and replay it over persistent buffers.
    supports_decode_graphs: ClassVar[bool] = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]: ``out`` when given
        """Write k, v into the cache at ``metadata.slot_mapping``, then attend.

        Grouped-query attention: query head h reads KV head ``h // (num_heads // num_kv_heads)``.
        A query row at context position p attends to positions ``0..p`` of its own sequence.
        ``k_scale``/``v_scale``: a float8 cache's scales (see the module docstring).
        """

    def forward_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,  # [num_tokens] int64
        cos_cache: torch.Tensor,  # [max_positions, head_dim // 2] float32
        sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """``forward`` with RoPE (rotate-half, angles ``cos_cache[positions]``) applied to q
        and k first; q may be rotated in place. Only backends with ``fuses_rope`` implement
        it."""
        raise NotImplementedError(f"the {self.name} attention backend does not fuse RoPE")
