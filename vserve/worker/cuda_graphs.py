"""CUDA graphs of the decode step, captured for a ladder of batch sizes.

A decode step (every scheduled sequence has one new token) is the same sequence of kernels
whatever the batch holds, up to the batch size, so it is captured once per size of a ladder
(1, 2, 4, 8, 16, 24, … up to ``max_batch_size``) and replayed for a batch padded to the
next size up.

The graphs read their inputs straight from the model runner's device staging buffer, at
fixed offsets (``mb`` = the largest captured size), so a step costs one host→device copy
and the graph launch:

    stage[0 : 5·mb]         [5, mb] int32: input ids, positions, slot mapping, seq lens,
                            persistent rows
    stage[5·mb]             the block table's row width for this step
    stage[5·mb + 16 : …]    the block table, packed ``[bs, width]``

The attention kernel reads the width from the device (``AttentionMetadata.block_table_stride``),
so one graph serves every context length and table width. Outputs: ``logits`` [mb, vocab] in the
model's dtype (a persistent buffer) and the greedy tokens, written by the graph's argmax over the input ids
``stage[0 : bs]`` and into ``last_tokens[row]``, so that a batch of plain greedy requests
needs no kernel after the graph (one device→host copy). An input id of ``DEVICE_TOKEN`` (-1)
is replaced by ``last_tokens[row]`` inside the graph: a step chained behind one in flight
(async scheduling) finds there the tokens that step sampled, whatever joined or left the
batch in between. Padded rows have token 0 at position 0, write their K/V to slot 0 of the
reserved null block 0, attend to that one token only and write their token to the dummy
row; their outputs are never read. All graphs share one memory pool
(captured largest first, as their intermediates are dead between replays).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from vserve.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


#: Where the block table starts after the five ``[mb]`` arrays and the width entry.
def table_offset(max_batch_size: int) -> int:
    return 5 * max_batch_size + 16


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to and including ``max_batch_size``."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch_size: int,
        max_blocks_per_seq: int,
        vocab_size: int,
        device: torch.device,
        stage: torch.Tensor,
        last_tokens: torch.Tensor,
        logits_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = mb = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        off = table_offset(mb)
        assert stage.numel() >= off + mb * max_blocks_per_seq
        self.stage = stage
        self.small = stage[: 5 * mb].view(5, mb)
        self.width = stage[5 * mb : 5 * mb + 1]
        self.last_tokens = last_tokens
        self.dummy_row = last_tokens.shape[0] - 1
        self.table = stage[off:]
        self.query_start = torch.arange(mb + 1, dtype=torch.int32, device=device)
        # In the model's dtype, as the LM head's GEMM writes it: a float32 copy of a 256-row
        # batch's logits took 0.1 ms of a 2 ms step, and argmax reads the 16-bit values just
        # as well (the conversion is exact). The sampler converts the rows it samples.
        self.logits = torch.zeros(mb, vocab_size, dtype=logits_dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None

    def padded_size(self, n: int) -> int | None:
        """The smallest captured size >= n, or None when n is too large for the graphs."""
        if n > self.max_batch_size:
            return None
        for s in self.sizes:
            if s >= n:
                return s
        return None  # pragma: no cover

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.small[2, :bs],
            query_start_loc=self.query_start[: bs + 1],
            seq_lens=self.small[3, :bs],
            # Shape [bs, max_blocks]; the kernel takes the row stride from ``self.width``.
            block_tables=self.table[: bs * self.max_blocks_per_seq].view(
                bs, self.max_blocks_per_seq),
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq,  # unused by the decode path
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
            block_table_stride=self.width,
        )

    def reset_inputs(self) -> None:
        """Dummy inputs: token 0 at position 0 in slot 0 of the null block, one token of
        context, a table of width 1 pointing at block 0, the dummy row."""
        self.small.zero_()
        self.small[3].fill_(1)
        self.small[4].fill_(self.dummy_row)
        self.width.fill_(1)
        self.table[: self.max_batch_size].zero_()

    def _forward(self, bs: int) -> None:
        from vserve.ops.sampling import argmax  # triton: CUDA only

        host_ids, rows = self.small[0, :bs], self.small[4, :bs].long()
        ids = torch.where(host_ids >= 0, host_ids, self.last_tokens[rows])
        hidden = self.model(ids, self.small[1, :bs], self.kv_caches, self._metadata(bs))
        logits = self.model.compute_logits(hidden, out=self.logits[:bs])
        # Greedy tokens come out of the graph too: over the input ids (where ``sampled_ids``
        # finds them) and into each row's ``last_tokens`` entry (where a chained step reads
        # them).
        argmax(logits, out=self.small[0, :bs])
        self.last_tokens.index_copy_(0, rows, self.small[0, :bs])

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info()[0]
        self.reset_inputs()
        # Warm up (Triton compilation, cuBLAS handles and workspaces) outside any capture.
        for bs in (self.sizes[-1], self.sizes[0]):
            self._forward(bs)
        torch.cuda.synchronize()
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        # A graph's first launch also uploads it to the device: do it now, over the dummy
        # inputs (padded rows only touch the null block and the dummy row).
        for graph in self.graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d) in %.1fs, %.0f MiB",
                    len(self.graphs), self.sizes[0], self.sizes[-1], time.perf_counter() - t0,
                    (free0 - torch.cuda.mem_get_info()[0]) / 2**20)

    def replay(self, bs: int) -> torch.Tensor:
        """Run the graph of size ``bs``; returns the view ``logits[:bs]`` (and
        ``sampled_ids(bs)`` holds the rows' greedy tokens)."""
        self.graphs[bs].replay()
        return self.logits[:bs]

    def sampled_ids(self, n: int) -> torch.Tensor:
        """int32 ``[n]``: the greedy tokens of the last replay's first ``n`` rows, until the
        next step's inputs are uploaded."""
        return self.small[0, :n]
