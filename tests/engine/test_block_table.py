"""The model runner's persistent batch state (``vserve.worker.block_table``): rows taken and
given back as requests join and leave, block ids copied only when they grow, and a step's
table and slots gathered from it — checked against the per-request lists they stand for,
under random churn that includes preemption (a new block list for the same request id) and
an id reused after its request finished."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vserve.worker.block_table import BatchRows, BlockTable

BS = 4


def _expected_table(lists: list[list[int]], width: int) -> list[list[int]]:
    return [(b[:width] + [0] * width)[:width] for b in lists]


@pytest.mark.parametrize("seed", range(5))
def test_rows_and_tables_follow_the_block_lists_under_churn(seed: int) -> None:
    """... and a mirror replaying the recorded changes (a tensor-parallel worker's table)
    holds the same table after every step."""
    rng = random.Random(seed)
    batch = BatchRows(num_rows=12, max_blocks_per_seq=16, record=True)
    mirror = BlockTable(12, 16)
    journal_ints = 0
    live: dict[str, list[int]] = {}  # request id -> its live block list
    next_block = 1
    next_id = 0
    for _step in range(300):
        # Leave: finished, or preempted (its list is replaced by a new one on re-admission).
        gone = [rid for rid in live if rng.random() < 0.1]
        batch.release(gone)
        for rid in gone:
            if rng.random() < 0.5:
                del live[rid]
            else:  # preempted and re-admitted in this step: a fresh list, same id
                live[rid] = []
        # Join, sometimes with an id that finished earlier.
        while len(live) < 6 and rng.random() < 0.8:
            rid = f"r{rng.randrange(next_id + 1)}" if rng.random() < 0.3 else f"r{next_id}"
            next_id += 1
            if rid not in live:
                live[rid] = []
        # Grow: every list is appended to, never rewritten in place.
        for blocks in live.values():
            for _ in range(rng.choice([0, 0, 1, 3]) if blocks else rng.randint(1, 4)):
                if len(blocks) < 16:
                    blocks.append(next_block)
                    next_block += 1
        step = [rid for rid in live if live[rid] and rng.random() < 0.9]
        if not step:
            continue
        rows = batch.rows_for(step, [live[r] for r in step])
        assert len(set(rows)) == len(rows) and batch.dummy_row not in rows
        journal = batch.block_table.take_journal()
        journal_ints += len(journal)
        mirror.apply(journal)
        assert np.array_equal(mirror.table, batch.block_table.table)
        rows_np = np.asarray(rows)
        width = max(len(live[r]) for r in step)
        got = batch.block_table.gather(rows_np, width).tolist()
        assert got == _expected_table([live[r] for r in step], width)
        positions = np.asarray([rng.randrange(len(live[r]) * BS) for r in step])
        slots = batch.block_table.slots(rows_np, positions, BS).tolist()
        assert slots == [live[r][p // BS] * BS + p % BS for r, p in zip(step, positions)]
    # The dummy row is never written: padded graph rows read zeros from it.
    assert not batch.block_table.table[batch.dummy_row].any()
    assert 0 < journal_ints < 300 * 6 * 16  # changes only, not whole tables every step


def test_a_new_list_for_a_row_is_copied_whole() -> None:
    table = BlockTable(2, 8)
    first = [3, 4, 5]
    table.sync(0, first)
    first.append(6)
    table.sync(0, first)
    assert table.table[0].tolist() == [3, 4, 5, 6, 0, 0, 0, 0]
    second = [9, 4]  # same length class, different object: rewritten, stale tail zeroed
    table.sync(0, second)
    assert table.table[0].tolist() == [9, 4, 0, 0, 0, 0, 0, 0]
    table.clear(0)
    assert not table.table.any()


def test_rows_run_out_with_a_clear_error() -> None:
    batch = BatchRows(num_rows=2, max_blocks_per_seq=4)
    batch.rows_for(["a", "b"], [[1], [2]])
    with pytest.raises(RuntimeError, match="no free batch row for 'c'"):
        batch.rows_for(["c"], [[3]])
    batch.release({"a"})
    assert batch.rows_for(["c"], [[3]]) == [0] and len(batch) == 2
