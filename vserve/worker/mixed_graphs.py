"""CUDA graphs of mixed steps: prompt chunks, alone or next to decode rows.

Under steady traffic nearly every step holds a prompt chunk (a request arrives while others
decode), and an eager forward costs its ~200 kernel launches whatever its size: on the H200
about 10 ms of host time against 2 ms for a graphed decode step of 256 rows. So steps of up
to ``max_tokens`` tokens and ``max_seqs`` sequences replay a graph captured for the next
token count up of a ladder (16, 32, 64, … ``max_tokens``).

What makes such a step replayable: every kernel's grid depends only on the token count ``T``
of the bucket. Linear layers and norms run over ``T`` rows. Attention is split by row kind:
the step's one-token sequences (decode rows) come first, and the decode kernel runs over
``seqs(T)`` rows, its programs past the device-held count ``num_decode`` doing nothing (one
program per KV head serves the whole query group: under churn these are most rows); the
RoPE/cache-write kernel skips those rows, and the prefill kernel gets a fixed list of
``tiles(T)`` query tiles of the other sequences (``vserve.ops.tiles``, padded with -1)
instead of a grid sized by the longest query. Block table row width is read from the
device. Logits are computed for ``seqs(T)`` gathered rows only (the rows that sample,
padded with row 0).

Inputs live in the runner's device staging buffer at the offsets of :class:`MixedLayout`;
``vserve.worker.cuda_inputs.CudaInputs.prepare_mixed`` writes them. Padded token rows hold
token 0 at position 0 with slot -1 (no cache write) and belong to no sequence, so nothing
reads their outputs; padded sequences have no tiles; padded sample rows read row 0 and
write their token to the dummy ``last_tokens`` row. As in the decode graphs, an input id of
``DEVICE_TOKEN`` is gathered from ``last_tokens`` and the greedy tokens come out over the
input ids (``sampled_ids``) and into ``last_tokens``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from vserve.attention.backend import AttentionMetadata
from vserve.ops.tiles import max_tiles

logger = logging.getLogger(__name__)

#: Largest token count a mixed-step graph is captured for: above it a step is compute-bound
#: and its launches are a small share of its time.
MAX_MIXED_GRAPH_TOKENS = 2048


def _al(n: int) -> int:
    """``n`` rounded up to 16 entries (64 bytes), so every segment is 16-byte aligned."""
    return -(-n // 16) * 16


def mixed_sizes(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then steps of 64 to 512, of 128 to 1024, of 256 beyond."""
    sizes = [16, 32, 64, 128]
    t = 128
    while t < max_tokens:
        t += 64 if t < 512 else 128 if t < 1024 else 256
        sizes.append(t)
    out = sorted({min(s, max_tokens) for s in sizes})
    return out


@dataclass(frozen=True)
class MixedLayout:
    """Offsets of a mixed step's inputs in the staging buffer (int32 entries).

    ``max_tokens`` (MT) rows of ids, positions, slots and persistent rows; ``max_seqs``
    (MS) + 1 query starts; MS sequence lengths, sampled row indices and their persistent
    rows; ``max_tiles`` tiles; the table width; the block table ``[MS, width]``.
    """

    max_tokens: int
    max_seqs: int
    block_m: int
    max_blocks_per_seq: int

    @property
    def max_tiles(self) -> int:
        return self.tiles_for(self.max_tokens)

    def seqs_for(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def tiles_for(self, tokens: int) -> int:
        return max_tiles(tokens, self.seqs_for(tokens), self.block_m)

    @property
    def ids(self) -> int:
        return 0

    @property
    def positions(self) -> int:
        return _al(self.max_tokens)

    @property
    def slots(self) -> int:
        return 2 * _al(self.max_tokens)

    @property
    def token_rows(self) -> int:
        return 3 * _al(self.max_tokens)

    @property
    def query_start(self) -> int:
        return 4 * _al(self.max_tokens)

    @property
    def seq_lens(self) -> int:
        return self.query_start + _al(self.max_seqs + 1)

    @property
    def sample_idx(self) -> int:
        return self.seq_lens + _al(self.max_seqs)

    @property
    def sample_rows(self) -> int:
        return self.sample_idx + _al(self.max_seqs)

    @property
    def tiles(self) -> int:
        return self.sample_rows + _al(self.max_seqs)

    @property
    def width(self) -> int:
        return self.tiles + _al(self.max_tiles)

    @property
    def num_decode(self) -> int:
        return self.width + 1

    @property
    def table(self) -> int:
        return self.width + 16

    @property
    def size(self) -> int:
        return self.table + self.max_seqs * self.max_blocks_per_seq


class MixedGraphs:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        layout: MixedLayout,
        vocab_size: int,
        device: torch.device,
        stage: torch.Tensor,
        last_tokens: torch.Tensor,
        pool: Any = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        assert stage.numel() >= layout.size
        self.model = model
        self.kv_caches = kv_caches
        self.layout = lay = layout
        self.sizes = mixed_sizes(layout.max_tokens)
        self.stage = stage
        self.last_tokens = last_tokens
        self.dummy_row = last_tokens.shape[0] - 1
        mt, ms = lay.max_tokens, lay.max_seqs
        self.ids = stage[lay.ids : lay.ids + mt]
        self.positions = stage[lay.positions : lay.positions + mt]
        self.slots = stage[lay.slots : lay.slots + mt]
        self.token_rows = stage[lay.token_rows : lay.token_rows + mt]
        self.query_start = stage[lay.query_start : lay.query_start + ms + 1]
        self.seq_lens = stage[lay.seq_lens : lay.seq_lens + ms]
        self.sample_idx = stage[lay.sample_idx : lay.sample_idx + ms]
        self.sample_rows = stage[lay.sample_rows : lay.sample_rows + ms]
        self.tiles = stage[lay.tiles : lay.tiles + lay.max_tiles]
        self.width = stage[lay.width : lay.width + 1]
        self.num_decode = stage[lay.num_decode : lay.num_decode + 1]
        self.table = stage[lay.table : lay.size]
        # The decode graphs' logits buffer serves here too (``logits``): a step's logits are
        # consumed (sampled, on the stream) before the next step's graph runs.
        if logits is None:
            logits = torch.zeros(ms, vocab_size, dtype=torch.float32, device=device)
        assert logits.shape[0] >= ms and logits.shape[1] == vocab_size
        self.logits = logits
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = pool
        self.replays = 0  # for tests and logs: steps that ran as a mixed-step graph

    def padded_size(self, num_tokens: int, num_seqs: int) -> int | None:
        """The smallest captured token count >= ``num_tokens`` that also holds
        ``num_seqs`` sequences, or None when the step is too large for the graphs."""
        if num_tokens > self.layout.max_tokens or num_seqs > self.layout.max_seqs:
            return None
        for t in self.sizes:
            if t >= num_tokens:
                return t
        return None  # pragma: no cover

    def _forward(self, t: int) -> None:
        from vserve.ops.sampling import argmax  # triton: CUDA only

        lay = self.layout
        s, nt = lay.seqs_for(t), lay.tiles_for(t)
        host_ids = self.ids[:t]
        ids = torch.where(host_ids >= 0, host_ids, self.last_tokens[self.token_rows[:t].long()])
        meta = AttentionMetadata(
            slot_mapping=self.slots[:t],
            query_start_loc=self.query_start[: s + 1],
            seq_lens=self.seq_lens[:s],
            block_tables=self.table[: s * lay.max_blocks_per_seq].view(
                s, lay.max_blocks_per_seq),
            max_query_len=t,  # any value > 1: the prefill path, whose grid ``tiles`` fixes
            max_seq_len=lay.max_blocks_per_seq,  # unused by the Triton backend
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            block_table_stride=self.width,
            prefill_tiles=self.tiles[:nt],
            num_decode_rows=self.num_decode,
        )
        hidden = self.model(ids, self.positions[:t], self.kv_caches, meta)
        picked = hidden[self.sample_idx[:s].long()]
        logits = self.model.compute_logits(picked, out=self.logits[:s])
        out = self.ids[:s]
        argmax(logits, out=out)
        self.last_tokens.index_copy_(0, self.sample_rows[:s].long(), out)

    def reset_inputs(self) -> None:
        """Dummy inputs: every token a padded row, no tiles, one sequence of one token."""
        self.ids.zero_()
        self.positions.zero_()
        self.slots.fill_(-1)
        self.token_rows.fill_(self.dummy_row)
        self.query_start.zero_()
        self.seq_lens.fill_(1)
        self.sample_idx.zero_()
        self.sample_rows.fill_(self.dummy_row)
        self.tiles.fill_(-1)
        self.width.fill_(1)
        self.num_decode.zero_()
        self.table.zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info()[0]
        self.reset_inputs()
        # Warm up every size outside a capture (cuBLAS picks and allocates per shape).
        for t in reversed(self.sizes):
            self._forward(t)
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for t in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(t)
            self.graphs[t] = graph
        torch.cuda.synchronize()
        # A graph's first launch also uploads it to the device (slow, and it would land on a
        # request's step): do it now, over the inert dummy inputs.
        for graph in self.graphs.values():
            graph.replay()
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs of mixed steps (%d..%d tokens) in %.1fs, %.0f MiB",
                    len(self.graphs), self.sizes[0], self.sizes[-1], time.perf_counter() - t0,
                    (free0 - torch.cuda.mem_get_info()[0]) / 2**20)

    def replay(self, t: int, num_sampled: int) -> torch.Tensor:
        """Run the graph of ``t`` tokens; returns the logits of the first ``num_sampled``
        sampled rows (and ``sampled_ids`` holds their greedy tokens)."""
        self.graphs[t].replay()
        self.replays += 1
        return self.logits[:num_sampled]

    def sampled_ids(self, n: int) -> torch.Tensor:
        return self.ids[:n]
