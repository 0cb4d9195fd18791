"""A step's integer inputs on their way to the GPU, and sampled ids on their way back.

Every CUDA step packs its token ids, positions, slots, query starts, sequence lengths, rows to
sample and block table into a pinned int32 host buffer and moves them with one host→device
copy into one device staging buffer, whose slices are the step's tensors (decode graphs read
fixed offsets of the same buffer, see ``vserve.worker.cuda_graphs``). Every CUDA API call
costs the host 5-12 us on the machines measured, so a step makes as few as it can.

A step chained behind one in flight (async scheduling) may need tokens that step is still
sampling. Every request in the batch holds a persistent *row*; each step scatters the tokens
it samples into ``last_tokens[row]`` on the device, and a position whose token the host does
not know yet is uploaded as ``DEVICE_TOKEN`` (-1) and gathered from there, so the chained
step never waits for the one before it, whatever joined or left the batch in between.

Two pinned buffers are used in turn, so that with async scheduling the inputs of step n+1
can be written while step n's copy may still be queued. Invariant: a pinned buffer is
written only once the copy that last read it is known to be complete, either because a
later result was synchronized (``completed``) or by waiting on the event recorded after that
copy (steps that sample nothing record one, as no result sync will follow them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vserve.attention.backend import AttentionMetadata
from vserve.core.sched_output import ScheduledRequest
from vserve.ops.tiles import prefill_tiles
from vserve.worker.block_table import BlockTable
from vserve.worker.cuda_graphs import table_offset
from vserve.worker.mixed_graphs import MixedLayout


def input_token(s: ScheduledRequest, p: int, overrides: dict[str, int] | None) -> int:
    """The token at position ``p`` of a one-token row: the request's own when it is known,
    else the token the step in flight samples for it (``overrides``; -1 when there are
    none: the device holds it, see ``CudaInputs``)."""
    tokens = s.request.all_token_ids
    if p < len(tokens):
        return tokens[p]
    if overrides is None:
        return DEVICE_TOKEN
    return overrides[s.request.request_id]


#: A host token id meaning "the last token sampled for this row, on the device".
DEVICE_TOKEN = -1


class CudaInputs:
    """``max_rows``: rows a batch may hold (``last_tokens`` has one more, the dummy row that
    padded graph rows write to)."""

    def __init__(self, size: int, graph_batch_size: int, max_rows: int,
                 device: torch.device) -> None:
        self.host = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.host_np = [h.numpy() for h in self.host]
        self.stage = torch.zeros(size, dtype=torch.int32, device=device)
        self.mb = graph_batch_size  # the graphs' input layout (cuda_graphs) uses it
        self.dummy_row = max_rows
        self.last_tokens = torch.zeros(max_rows + 1, dtype=torch.int32, device=device)
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._last_use = [0, 0]  # number of the upload that last read each pinned buffer
        self._recorded = [False, False]  # an event follows that upload
        self._uploads = 0
        self._done = 0  # uploads known complete
        self._next = 0
        # Sampled ids come back through pinned buffers used in turn as well.
        self._out = [torch.zeros(max(graph_batch_size, max_rows, 1), dtype=torch.int32,
                                 pin_memory=True) for _ in range(2)]
        self._out_events = [torch.cuda.Event(), torch.cuda.Event()]
        self._next_out = 0

    # ---- pinned buffers -----------------------------------------------------------------
    def _writable(self) -> np.ndarray:
        i = self._next
        if self._last_use[i] > self._done:
            if self._recorded[i]:
                self._events[i].synchronize()
                self._done = max(self._done, self._last_use[i])
            else:  # not expected (results are read in order); stay safe regardless
                torch.cuda.current_stream().synchronize()
                self._done = self._uploads
        return self.host_np[i]

    def _upload(self, start: int, end: int, record: bool) -> int:
        i = self._next
        self.stage[start:end].copy_(self.host[i][start:end], non_blocking=True)
        self._uploads += 1
        self._last_use[i] = self._uploads
        if record:
            self._events[i].record()
        self._recorded[i] = record
        self._next = 1 - i
        return self._uploads

    def completed(self, upload: int) -> None:
        """The host has synchronized with work queued after upload number ``upload``."""
        if upload > self._done:
            self._done = upload

    def read_back(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Queue a copy of the int32 ``ids`` into a pinned buffer; returns ``(host view,
        event)``. The view is valid after ``event.synchronize()`` until the next-but-one
        call."""
        i = self._next_out
        self._next_out = 1 - i
        host = self._out[i][: ids.numel()]
        host.copy_(ids, non_blocking=True)
        ev = self._out_events[i]
        ev.record()
        return host, ev

    # ---- eager steps --------------------------------------------------------------------
    def prepare_eager(self, scheduled: list[ScheduledRequest], rows: list[int],
                      table: BlockTable, block_size: int,
                      overrides: dict[str, int] | None = None) -> EagerInputs:
        """Inputs of any step in one copy. ``rows[i]`` is scheduled row i's persistent row,
        whose block ids ``table`` holds.

        A position whose token the host does not know (the step in flight samples it, and
        ``overrides`` is None) is gathered from ``last_tokens`` on the device.
        """
        bs = block_size
        ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_row_ids: list[int] = []
        token_rows: list[int] = []
        dummy = self.dummy_row
        any_device = False
        for s, row in zip(scheduled, rows, strict=True):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens + s.num_ahead
            end = start + n
            if n == 1:
                tok = input_token(s, start, overrides)
                any_device |= tok == DEVICE_TOKEN
                ids.append(tok)
                positions.append(start)
                token_rows.append(row)
            else:
                ids.extend(req.all_token_ids[start:end])
                positions.extend(range(start, end))
                token_rows.extend([dummy] * n)
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if s.sample:
                sample_rows.append(qsl[-1] - 1)
                sample_row_ids.append(row)
        t, ns, nr = len(ids), len(seq_lens), len(sample_rows)
        width = -(-max(seq_lens) // bs)
        rows_np = np.asarray(rows, dtype=np.int64)
        pos_np = np.asarray(positions, dtype=np.int64)
        slots = table.slots(np.repeat(rows_np, np.diff(qsl)), pos_np, bs)
        h = self._writable()
        # Segments start at multiples of 16 entries (64 bytes), so the kernels always see
        # 16-byte-aligned pointers (Triton specializes on alignment: no extra compilations).
        offsets = []
        o = 0
        for seg in (ids, pos_np, slots, qsl, seq_lens, sample_rows, sample_row_ids,
                    token_rows if any_device else ()):
            offsets.append(o)
            h[o : o + len(seg)] = seg
            o += -(-len(seg) // 16) * 16
        offsets.append(o)
        n_all = o + ns * width
        h[o:n_all] = table.gather(rows_np, width).ravel()
        upload = self._upload(0, n_all, record=not sample_rows)
        stage = self.stage
        o_ids, o_pos, o_slot, o_qsl, o_len, o_rows, o_srow, o_trow, o_bt = offsets
        meta = AttentionMetadata(
            slot_mapping=stage[o_slot : o_slot + t],
            query_start_loc=stage[o_qsl : o_qsl + ns + 1],
            seq_lens=stage[o_len : o_len + ns],
            block_tables=stage[o_bt:n_all].view(ns, width),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        input_ids = stage[o_ids : o_ids + t]
        if any_device:
            rows_t = stage[o_trow : o_trow + t].long()
            input_ids = torch.where(input_ids >= 0, input_ids, self.last_tokens[rows_t])
        return EagerInputs(
            input_ids, stage[o_pos : o_pos + t], meta,
            stage[o_rows : o_rows + nr] if nr else None,
            stage[o_srow : o_srow + nr] if nr else None, upload)

    def scatter_last_tokens(self, row_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record ``tokens`` (int32, on the device) as the last sampled token of ``row_ids``."""
        self.last_tokens.index_copy_(0, row_ids.long(), tokens.to(torch.int32))

    # ---- decode graphs ------------------------------------------------------------------
    def prepare_decode(self, scheduled: list[ScheduledRequest], rows: list[int],
                       table: BlockTable, padded: int, block_size: int, samples: bool = True,
                       overrides: dict[str, int] | None = None) -> int:
        """Write a pure decode step's inputs where the graphs read them with one copy;
        returns the upload number. Padded rows: token 0 at position 0, slot 0 of the null
        block, one token of context, a table row of zeros, the dummy row.

        A row whose token the host does not know yet is uploaded as ``DEVICE_TOKEN``: the
        graph gathers it from ``last_tokens`` (and scatters the tokens it samples there).
        """
        mb = self.mb
        positions = [s.request.num_computed_tokens + s.num_ahead for s in scheduled]
        ids = [input_token(s, p, overrides) for s, p in zip(scheduled, positions)]
        n = len(scheduled)
        rows_np = np.asarray(rows, dtype=np.int64)
        pos_np = np.asarray(positions, dtype=np.int64)
        width = int(pos_np.max()) // block_size + 1
        off = table_offset(mb)
        end = off + padded * width
        h = self._writable()
        h[0:n] = ids
        h[mb : mb + n] = pos_np
        h[2 * mb : 2 * mb + n] = table.slots(rows_np, pos_np, block_size)
        h[3 * mb : 3 * mb + n] = pos_np + 1
        h[4 * mb : 4 * mb + n] = rows_np
        if padded > n:
            h[n:padded] = 0
            h[mb + n : mb + padded] = 0
            h[2 * mb + n : 2 * mb + padded] = 0
            h[3 * mb + n : 3 * mb + padded] = 1
            h[4 * mb + n : 4 * mb + padded] = self.dummy_row
            h[off + n * width : end] = 0
        h[5 * mb] = width
        h[off : off + n * width] = table.gather(rows_np, width).ravel()
        return self._upload(0, end, record=not samples)

    # ---- mixed-step graphs --------------------------------------------------------------
    def prepare_mixed(self, scheduled: list[ScheduledRequest], rows: list[int],
                      table: BlockTable, layout: MixedLayout, padded: int, block_size: int,
                      overrides: dict[str, int] | None = None) -> tuple[int, int]:
        """Write the inputs of a step of any shape where the mixed-step graph of ``padded``
        tokens reads them (``vserve.worker.mixed_graphs``), with one copy. Returns the
        upload number and how many rows sample (the graph's first sampled rows, in the
        order of ``scheduled``)."""
        h = self._writable()
        n_sample, end = pack_mixed(h, scheduled, rows, table, layout, padded, block_size,
                                   self.dummy_row, overrides)
        return self._upload(0, end, record=n_sample == 0), n_sample


def mixed_order(scheduled: list[ScheduledRequest]) -> list[int]:
    """Indices of ``scheduled`` with the one-token rows first (stable)."""
    return sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)


def pack_mixed(h: np.ndarray, scheduled: list[ScheduledRequest], rows: list[int],
               table: BlockTable, layout: MixedLayout, padded: int, block_size: int,
               dummy_row: int, overrides: dict[str, int] | None) -> tuple[int, int]:
    """Fill ``h`` (int32, ``layout.size`` entries) with a step's inputs at the offsets of
    ``layout``, padded to ``padded`` tokens. ``rows[i]``: scheduled row i's persistent row,
    whose block ids ``table`` holds. Returns the number of rows that sample and the end of
    what the graph reads (the table, last, is ``[seqs, width]``).

    The leading one-token rows of ``scheduled`` are the decode kernel's (``num_decode``);
    put them first (``mixed_order``) so that every decode row is."""
    lay = layout
    ids: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    sample_idx: list[int] = []
    sample_rows: list[int] = []
    for s, row in zip(scheduled, rows, strict=True):
        req, n = s.request, s.num_new_tokens
        start = req.num_computed_tokens + s.num_ahead
        end = start + n
        if n == 1:
            ids.append(input_token(s, start, overrides))
            positions.append(start)
            token_rows.append(row)
        else:
            ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            token_rows.extend([dummy_row] * n)
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        if s.sample:
            sample_idx.append(qsl[-1] - 1)
            sample_rows.append(row)
    t, ns, nr = len(ids), len(seq_lens), len(sample_idx)
    width = -(-max(seq_lens) // block_size)
    seqs = lay.seqs_for(padded)
    assert t <= padded and ns <= seqs
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    num_decode = 0
    while num_decode < ns and q_lens[num_decode] == 1:
        num_decode += 1
    tiles: list[int] = []
    prefill_tiles(q_lens, lay.block_m, tiles, first=num_decode)
    nt = lay.tiles_for(padded)
    assert len(tiles) <= nt
    rows_np = np.asarray(rows, dtype=np.int64)
    pos_np = np.asarray(positions, dtype=np.int64)
    h[lay.ids : lay.ids + t] = ids
    h[lay.ids + t : lay.ids + padded] = 0
    h[lay.positions : lay.positions + t] = pos_np
    h[lay.positions + t : lay.positions + padded] = 0
    h[lay.slots : lay.slots + t] = table.slots(np.repeat(rows_np, q_lens), pos_np, block_size)
    h[lay.slots + t : lay.slots + padded] = -1
    h[lay.token_rows : lay.token_rows + t] = token_rows
    h[lay.token_rows + t : lay.token_rows + padded] = dummy_row
    h[lay.query_start : lay.query_start + ns + 1] = qsl
    h[lay.query_start + ns + 1 : lay.query_start + seqs + 1] = t
    h[lay.seq_lens : lay.seq_lens + ns] = seq_lens
    h[lay.seq_lens + ns : lay.seq_lens + seqs] = 1
    h[lay.sample_idx : lay.sample_idx + nr] = sample_idx
    h[lay.sample_idx + nr : lay.sample_idx + seqs] = 0
    h[lay.sample_rows : lay.sample_rows + nr] = sample_rows
    h[lay.sample_rows + nr : lay.sample_rows + seqs] = dummy_row
    h[lay.tiles : lay.tiles + len(tiles)] = tiles
    h[lay.tiles + len(tiles) : lay.tiles + nt] = -1
    h[lay.width] = width
    h[lay.num_decode] = num_decode
    h[lay.table : lay.table + ns * width] = table.gather(rows_np, width).ravel()
    end = lay.table + seqs * width
    h[lay.table + ns * width : end] = 0
    return nr, end


class EagerInputs(NamedTuple):
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor | None  # token index of each sampling row's last token
    sample_row_ids: torch.Tensor | None  # the persistent row of each sampling row
    upload: int
