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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Computes causal attention for a flat batch over the paged KV cache."""

    name: str = "abstract"

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
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k, v into the cache at ``metadata.slot_mapping``, then attend.

        Grouped-query attention: query head h reads KV head ``h // (num_heads // num_kv_heads)``.
        A query row at context position p attends to positions ``0..p`` of its own sequence.
        """
