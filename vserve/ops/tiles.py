"""How the tiled prefill kernel's fixed grid is listed (host side, no Triton import).

A CUDA graph cannot size the prefill attention grid by the step's longest query, so the host
lists the step's query tiles instead and the kernel runs one program per list entry (and
head): entry ``seq << TILE_SHIFT | tile`` is rows ``tile·block_m ..`` of sequence ``seq``.
"""

from __future__ import annotations

import torch

#: Bits of a listed entry holding the tile index (so at most 4096 tiles per sequence).
TILE_SHIFT = 12


def prefill_block_m(dtype: torch.dtype, head_dim: int) -> int:
    """Query rows per prefill program, for a cache of ``dtype`` and heads of ``head_dim``."""
    half_block = max(16, 1 << (head_dim // 2 - 1).bit_length())
    return 32 if dtype == torch.float32 or half_block > 64 else 64


def prefill_tiles(q_lens: list[int], block_m: int, out: list[int], first: int = 0) -> None:
    """Append the query tiles of sequences ``first ..`` (with ``q_lens`` new rows) to
    ``out``."""
    for s in range(first, len(q_lens)):
        n = q_lens[s]
        base = s << TILE_SHIFT
        if n <= block_m:
            out.append(base)
        else:
            out.extend(range(base, base + -(-n // block_m)))


def max_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """An upper bound of ``len(prefill_tiles(q_lens))`` for ``sum(q_lens) <= num_tokens``
    over ``num_seqs`` sequences: ``sum(ceil(q / m)) <= tokens / m + seqs``."""
    return -(-num_tokens // block_m) + num_seqs
