"""The persistent batch state of the model runner: one row per request in the batch.

A request gets a *row* at its first step and keeps it until the step that reports it
finished or preempted (``BatchRows``). Its block ids live in that row of one preallocated
``int32 [rows + 1, max_blocks]`` array (``BlockTable``), written only when the request gains
blocks: a step's block table and slot mapping are numpy gathers over the step's rows, not
lists rebuilt per request and per block every step (vLLM's persistent input batch does the
same). The last row is the dummy row that padded graph rows use: always zeros.

Invariant relied on (``KVCacheManager.get_block_ids``): a request's ``block_ids`` is the same
list object from admission until it is freed, and only grows; a preempted request gets a new
list when re-admitted. So a row whose list object changed is rewritten from scratch, and
otherwise only its new tail is copied.
"""

from __future__ import annotations

import numpy as np

_CLEAR = -1  # journal entry ``[row, _CLEAR]``; a write is ``[row, start, count, *ids]``


class BlockTable:
    """``journal``: when a list (``record=True``), every change is appended to it as well,
    flat int32 entries that :meth:`apply` replays on a mirror table in another process (a
    tensor-parallel worker's): the mirror then holds the same rows, and a step needs only
    the changes, not its whole block table."""

    def __init__(self, num_rows: int, max_blocks_per_seq: int, record: bool = False) -> None:
        # np.zeros: pages of rows never used stay virtual (a long max_model_len costs
        # nothing until requests that long arrive).
        self.table = np.zeros((num_rows + 1, max_blocks_per_seq), dtype=np.int32)
        self._lists: list[list[int] | None] = [None] * (num_rows + 1)
        self._lens = [0] * (num_rows + 1)
        self.journal: list[int] | None = [] if record else None

    def sync(self, row: int, block_ids: list[int]) -> None:
        """Make ``table[row]`` hold ``block_ids`` (copies only what is new)."""
        have = self._lens[row]
        n = len(block_ids)
        if self._lists[row] is not block_ids or n < have:
            if have:
                self._zero(row, have)
            self._lists[row] = block_ids
            have = 0
        if n > have:
            self.table[row, have:n] = block_ids[have:n]
            self._lens[row] = n
            if self.journal is not None:
                self.journal += (row, have, n - have, *block_ids[have:n])

    def clear(self, row: int) -> None:
        """The row's request left the batch: zero what it wrote."""
        have = self._lens[row]
        if have:
            self._zero(row, have)
        self._lens[row] = 0
        self._lists[row] = None

    def _zero(self, row: int, have: int) -> None:
        self.table[row, :have] = 0
        if self.journal is not None:
            self.journal += (row, _CLEAR)

    def take_journal(self) -> np.ndarray:
        """The changes recorded since the last call (int32), and a fresh journal."""
        assert self.journal is not None
        out = np.asarray(self.journal, dtype=np.int32)
        self.journal = []
        return out

    def apply(self, journal: np.ndarray) -> None:
        """Replay another table's recorded changes on this one (its mirror)."""
        entries = journal.tolist()
        i = 0
        while i < len(entries):
            row, start = entries[i], entries[i + 1]
            if start == _CLEAR:
                self.table[row, : self._lens[row]] = 0
                self._lens[row] = 0
                i += 2
                continue
            count = entries[i + 2]
            self.table[row, start : start + count] = entries[i + 3 : i + 3 + count]
            self._lens[row] = start + count
            i += 3 + count

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        """``[len(rows), width]``: each row's first ``width`` block ids, zero-padded."""
        return self.table[rows, :width]

    def slots(self, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
        """The KV cache slot of each ``(row, position)`` pair (int64 arrays of one length)."""
        return self.table[rows, positions // block_size] * block_size + positions % block_size


class BatchRows:
    """Which row each request in the batch holds, and the rows' block table.

    Rows are taken at a request's first step (``rows_for``) and given back when a step
    reports it finished or preempted (``release``) — always before that step's rows are
    taken, so a re-admitted request (same id) starts on a clean row.
    """

    def __init__(self, num_rows: int, max_blocks_per_seq: int, record: bool = False) -> None:
        self.num_rows = num_rows
        self.dummy_row = num_rows
        self.block_table = BlockTable(num_rows, max_blocks_per_seq, record)
        self._rows: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def rows_for(self, request_ids: list[str], block_ids: list[list[int]]) -> list[int]:
        """Each request's row (taken now if it has none), its block ids synced."""
        rows = self._rows
        sync = self.block_table.sync
        out = []
        for rid, blocks in zip(request_ids, block_ids, strict=True):
            row = rows.get(rid)
            if row is None:
                if not self._free:
                    raise RuntimeError(f"no free batch row for {rid!r} ({self.num_rows} rows)")
                row = rows[rid] = self._free.pop()
            sync(row, blocks)
            out.append(row)
        return out

    def release(self, request_ids: set[str] | list[str]) -> None:
        for rid in request_ids:
            row = self._rows.pop(rid, None)
            if row is not None:
                self.block_table.clear(row)
                self._free.append(row)

    def __len__(self) -> int:
        return len(self._rows)
