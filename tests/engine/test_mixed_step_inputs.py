"""The host side of the CUDA graphs of mixed steps, on CPU: the query tiles the fixed-grid
prefill kernel walks, and the packed inputs a graph reads (``pack_mixed``).

The graphs themselves, and the kernel, run in ``tests/gpu`` (skipped without CUDA); what is
checked here is that every real token, sequence and tile lands where the graph reads it,
and that padding stays inert: no cache write (slot -1), no tile, the dummy row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vserve.core.request import Request
from vserve.core.sched_output import ScheduledRequest
from vserve.ops.tiles import TILE_SHIFT, max_tiles, prefill_block_m, prefill_tiles
from vserve.protocol.sampling import SamplingParams
from vserve.worker.block_table import BatchRows, BlockTable
from vserve.worker.cuda_inputs import DEVICE_TOKEN, mixed_order, pack_mixed
from vserve.worker.mixed_graphs import MixedLayout, mixed_sizes


def test_tiles_cover_every_row_once() -> None:
    q_lens = [1, 64, 65, 1, 200, 0 + 3]
    tiles: list[int] = []
    prefill_tiles(q_lens, 64, tiles)
    rows = []
    for t in tiles:
        s, m = t >> TILE_SHIFT, t & ((1 << TILE_SHIFT) - 1)
        rows += [(s, i) for i in range(m * 64, min(q_lens[s], (m + 1) * 64))]
    assert sorted(rows) == [(s, i) for s, n in enumerate(q_lens) for i in range(n)]
    assert len(tiles) == 1 + 1 + 2 + 1 + 4 + 1
    assert len(tiles) <= max_tiles(sum(q_lens), len(q_lens), 64)


def test_block_m_follows_the_kernel_rule() -> None:
    assert prefill_block_m(torch.bfloat16, 64) == 64
    assert prefill_block_m(torch.bfloat16, 128) == 64
    assert prefill_block_m(torch.bfloat16, 256) == 32
    assert prefill_block_m(torch.float32, 64) == 32


def test_sizes_ladder() -> None:
    sizes = mixed_sizes(2048)
    assert sizes[:5] == [16, 32, 64, 128, 192] and sizes[-1] == 2048
    assert sizes == sorted(set(sizes))
    assert mixed_sizes(100) == [16, 32, 64, 100]


def _table(scheduled: list[ScheduledRequest], max_blocks: int) -> tuple[list[int], BlockTable]:
    """Persistent rows for ``scheduled`` (taken in order: 0, 1, …) and their block table."""
    batch = BatchRows(16, max_blocks)
    rows = batch.rows_for([s.request.request_id for s in scheduled],
                          [s.block_ids for s in scheduled])
    return rows, batch.block_table


def _req(rid: str, prompt: list[int], computed: int, out: tuple[int, ...] = ()) -> Request:
    r = Request(rid, prompt, SamplingParams(max_tokens=8), [])
    r.all_token_ids.extend(out)
    r.output_token_ids.extend(out)
    r.num_computed_tokens = computed
    return r


@pytest.mark.parametrize("chained", [False, True])
def test_pack_mixed_places_every_input(chained: bool) -> None:
    bs = 4
    layout = MixedLayout(max_tokens=64, max_seqs=8, block_m=16, max_blocks_per_seq=10)
    # A decode row (its token known, or in flight when chained), a whole 7-token prompt,
    # and a middle chunk of a longer prompt (does not sample).
    dec = _req("d", [5, 6, 7], computed=2 if chained else 3, out=() if chained else (9,))
    if chained:
        dec_sched = ScheduledRequest(dec, 1, [3, 4], num_ahead=1, sample=True)
    else:
        dec_sched = ScheduledRequest(dec, 1, [3, 4], sample=True)
    full = ScheduledRequest(_req("p", list(range(100, 107)), 0), 7, [5, 6], sample=True)
    chunk = ScheduledRequest(_req("c", list(range(200, 240)), 16), 20, list(range(7, 16)),
                             sample=False)
    scheduled = [dec_sched, full, chunk]
    h = np.full(layout.size, 12345, dtype=np.int32)
    dummy = 99
    rows, table = _table(scheduled, 10)
    assert rows == [0, 1, 2]
    n_sample, end = pack_mixed(h, scheduled, rows, table, layout, 32, bs, dummy, None)
    assert n_sample == 2
    t = 1 + 7 + 20
    ids = h[layout.ids : layout.ids + 32].tolist()
    assert ids[0] == (DEVICE_TOKEN if chained else 9)
    assert ids[1:8] == list(range(100, 107)) and ids[8:t] == list(range(216, 236))
    assert ids[t:] == [0] * (32 - t)
    pos = h[layout.positions : layout.positions + 32].tolist()
    assert pos[:t] == [3] + list(range(7)) + list(range(16, 36)) and pos[t:] == [0] * (32 - t)
    slots = h[layout.slots : layout.slots + 32].tolist()
    assert slots[0] == 3 * bs + 3
    assert slots[1:8] == [5 * bs + p for p in range(4)] + [6 * bs + p for p in range(3)]
    assert slots[8] == 11 * bs + 0 and slots[t - 1] == 15 * bs + 3
    assert slots[t:] == [-1] * (32 - t)  # padded rows write nothing
    rows = h[layout.token_rows : layout.token_rows + t].tolist()
    assert rows == [0] + [dummy] * 27
    seqs = layout.seqs_for(32)
    assert seqs == 8
    qsl = h[layout.query_start : layout.query_start + seqs + 1].tolist()
    assert qsl == [0, 1, 8, t] + [t] * 5
    assert h[layout.seq_lens : layout.seq_lens + 3].tolist() == [4, 7, 36]
    assert h[layout.sample_idx : layout.sample_idx + seqs].tolist() == [0, 7] + [0] * 6
    assert h[layout.sample_rows : layout.sample_rows + seqs].tolist() == [0, 1] + [dummy] * 6
    nt = layout.tiles_for(32)
    # The decode row (sequence 0) is the decode kernel's: no tile lists it.
    assert h[layout.num_decode] == 1
    tiles = h[layout.tiles : layout.tiles + nt].tolist()
    assert tiles[:3] == [1 << TILE_SHIFT, 2 << TILE_SHIFT, (2 << TILE_SHIFT) | 1]
    assert tiles[3:] == [-1] * (nt - 3)
    width = h[layout.width]
    assert width == 9  # 36 tokens in blocks of 4
    table = h[layout.table : layout.table + seqs * width].reshape(seqs, width).tolist()
    assert table[0] == [3, 4] + [0] * 7 and table[2] == list(range(7, 16))
    assert table[3:] == [[0] * 9] * 5
    assert end == layout.table + seqs * width <= layout.size


def test_pack_mixed_rejects_what_the_graph_cannot_hold() -> None:
    layout = MixedLayout(max_tokens=64, max_seqs=2, block_m=16, max_blocks_per_seq=4)
    scheduled = [ScheduledRequest(_req(f"r{i}", [1, 2], 0), 2, [1], sample=True)
                 for i in range(3)]
    h = np.zeros(layout.size, dtype=np.int32)
    rows, table = _table(scheduled, 4)
    with pytest.raises(AssertionError):
        pack_mixed(h, scheduled, rows, table, layout, 16, 4, 9, None)


def test_one_token_rows_go_first_in_order() -> None:
    reqs = [ScheduledRequest(_req(f"r{i}", [1] * 9, 0), n, [1, 2, 3]) for i, n in
            enumerate([5, 1, 9, 1, 1, 2])]
    order = mixed_order(reqs)
    assert order == [1, 3, 4, 0, 2, 5]
    layout = MixedLayout(max_tokens=64, max_seqs=8, block_m=16, max_blocks_per_seq=4)
    h = np.zeros(layout.size, dtype=np.int32)
    ordered = [reqs[i] for i in order]
    rows, table = _table(ordered, 4)
    pack_mixed(h, ordered, rows, table, layout, 32, 4, 9, None)
    assert h[layout.num_decode] == 3
    tiles = h[layout.tiles : layout.tiles + 3].tolist()
    assert [t >> TILE_SHIFT for t in tiles] == [3, 4, 5]
