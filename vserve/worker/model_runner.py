"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

It owns the model, the paged KV cache tensors and the sampler. The attention backend is
chosen by device: the torch reference on CPU, the Triton kernels on CUDA.

CPU: inputs are built on the host as flat lists, one tensor each.

CUDA (see ``docs/design/gpu.md``): a step's integer inputs (token ids, positions, slots,
query starts, sequence lengths, block table, rows to sample) are packed into one pinned
int32 host buffer and moved with a single copy into one device buffer, whose slices are the
step's tensors. Pure decode steps of up to ``max_num_seqs`` sequences (at most 256) replay a
CUDA graph captured for the next batch size up (``vserve.worker.cuda_graphs``), unless
``enforce_eager``. KV-cache blocks are sized from the free memory measured after a profiling
forward pass of a full token budget, under ``gpu_memory_utilization``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from vserve.config import EngineConfig
from vserve.core.sched_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from vserve.engine.messages import Logprobs
from vserve.models.arch import ModelArchConfig, load_arch_config
from vserve.models.loader import load_model, resolve_dtype
from vserve.worker import kv_sizing
from vserve.worker.attention.backend import AttentionBackend, AttentionMetadata
from vserve.worker.cuda_graphs import DecodeGraphs, table_offset
from vserve.worker.sampler import Sampler, SamplerOutput, gather_logprobs

logger = logging.getLogger(__name__)


def select_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def select_attention_backend(device: torch.device) -> AttentionBackend:
    # The Triton backend lives in vserve.ops and is imported only on CUDA.
    if device.type == "cuda":
        from vserve.worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from vserve.worker.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()


MAX_GRAPH_BATCH_SIZE = 256
_ALIGN_PAD = [0] * 16


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        self.device = select_device(config.device.device)
        self.arch: ModelArchConfig = load_arch_config(model_dir)
        self.dtype = resolve_dtype(self.arch, config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.max_model_len = self._max_model_len()
        self.attn_backend = select_attention_backend(self.device)
        self.skip_compute = config.device.benchmark_skip_compute
        self.model: Any = None
        if self.skip_compute:
            logger.warning("BENCHMARK MODE: the model is not loaded and outputs are fake "
                           "tokens; use this only to measure the front end")
        else:
            self.model = load_model(model_dir, self.arch, self.dtype, self.device,
                                    self.attn_backend)
        self.sampler = Sampler(self.device, config.model.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.is_cuda = self.device.type == "cuda" and not self.skip_compute
        self.graphs: DecodeGraphs | None = None
        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        if self.is_cuda:
            self._init_cuda_buffers()

    def _max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window is not None:
            # Attention over a window is not implemented: serve only lengths where the window
            # covers everything, so results stay exact.
            limit = min(limit, self.arch.sliding_window)
        requested = self.config.model.max_model_len
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(
                f"max_model_len={requested} exceeds what this model supports ({limit}: "
                "max_position_embeddings"
                + (" / sliding_window)" if self.arch.sliding_window is not None else ")")
            )
        return requested

    # ---- KV cache sizing -------------------------------------------------------------
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.arch.kv_cache_bytes_per_token(elem) * self.block_size

    def determine_num_blocks(self) -> int:
        """Blocks that fit the memory budget (+1 for the reserved null block 0)."""
        return kv_sizing.determine_num_blocks(self)

    def graph_batch_size(self) -> int:
        return min(self.config.scheduler.max_num_seqs, MAX_GRAPH_BATCH_SIZE)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        if self.skip_compute:
            return  # nothing reads or writes the cache in benchmark mode
        shape = (num_blocks, self.block_size, self.arch.num_key_value_heads, self.arch.head_dim)
        # CPU: empty, not zeros — attention reads only slots it wrote, and untouched pages
        # cost no resident memory (a 1 GiB budget for a tiny model stays virtual).
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        self.kv_caches = [
            (
                alloc(shape, dtype=self.dtype, device=self.device),
                alloc(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.arch.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        if self.is_cuda and not self.config.device.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, self.graph_batch_size(), self.max_blocks_per_seq,
                self.arch.hidden_size, self.arch.vocab_size, self.dtype, self.device,
                self._stage)
            self.graphs.capture()

    # ---- CUDA input staging ----------------------------------------------------------
    def _init_cuda_buffers(self) -> None:
        sc = self.config.scheduler
        max_tokens = max(sc.max_num_batched_tokens, self.graph_batch_size())
        max_seqs = max(sc.max_num_seqs, self.graph_batch_size())
        # ids, positions, slots (tokens); query starts, seq lens, sample rows (seqs); table;
        # plus alignment padding of each segment.
        size = (3 * max_tokens + 3 * max_seqs + 1 + max_seqs * self.max_blocks_per_seq
                + 6 * 16)
        size = max(size, table_offset(self.graph_batch_size())
                   + self.graph_batch_size() * self.max_blocks_per_seq)
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self._host_np = self._host.numpy()
        self._stage = torch.zeros(size, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event()
        self._copied.record()
        # True once the stream has been synchronized since the last upload (the sampled
        # ids' device→host copy does that), so the next upload need not wait. A step that
        # samples nothing records ``_copied`` right after its upload instead, and the next
        # upload waits for that event before overwriting the pinned buffer.
        self._host_free = True

    def _upload(self, data: list[int], samples: bool = True) -> torch.Tensor:
        """One host→device copy of ``data`` through the pinned buffer; returns the device
        slice. Waits for the previous copy first, so the pinned buffer is never overwritten
        while a copy from it is in flight."""
        n = len(data)
        if not self._host_free:
            self._copied.synchronize()
        self._host_np[:n] = data
        stage = self._stage[:n]
        stage.copy_(self._host[:n], non_blocking=True)
        self._after_upload(samples)
        return stage

    def _after_upload(self, samples: bool) -> None:
        if not samples:
            # No device→host copy will end this step: mark when the pinned buffer is free.
            self._copied.record()
        self._host_free = False

    @staticmethod
    def _block_table_rows(scheduled: list[ScheduledRequest], width: int,
                          out: list[int]) -> None:
        for s in scheduled:
            b = s.block_ids
            if len(b) >= width:
                out.extend(b[:width])
            else:
                out.extend(b)
                out.extend([0] * (width - len(b)))

    def _prepare_cuda(self, scheduled: list[ScheduledRequest]) -> tuple[
        torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None
    ]:
        """The eager CUDA path's inputs, in one copy. Returns ``(ids, positions, metadata,
        rows to sample or None)``."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        width = 0
        for s in scheduled:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            end = start + n
            blocks = s.block_ids
            if n == 1:
                ids.append(req.all_token_ids[start])
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                ids.extend(req.all_token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if end == req.num_tokens:  # s.samples
                sample_rows.append(qsl[-1] - 1)
            width = max(width, -(-end // bs))
        t, ns, nr = len(ids), len(seq_lens), len(sample_rows)
        # Segments start at multiples of 16 entries (64 bytes), so the kernels always see
        # 16-byte-aligned pointers (Triton specializes on alignment: no extra compilations).
        data: list[int] = []
        offsets = []
        for seg in (ids, positions, slots, qsl, seq_lens, sample_rows):
            offsets.append(len(data))
            data.extend(seg)
            data.extend(_ALIGN_PAD[: -len(data) % 16])
        offsets.append(len(data))
        self._block_table_rows(scheduled, width, data)
        stage = self._upload(data, bool(sample_rows))
        o_ids, o_pos, o_slot, o_qsl, o_len, o_rows, o_bt = offsets
        meta = AttentionMetadata(
            slot_mapping=stage[o_slot : o_slot + t],
            query_start_loc=stage[o_qsl : o_qsl + ns + 1],
            seq_lens=stage[o_len : o_len + ns],
            block_tables=stage[o_bt:].view(ns, width),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        rows = stage[o_rows : o_rows + nr] if nr else None
        return stage[o_ids : o_ids + t], stage[o_pos : o_pos + t], meta, rows

    def _prepare_decode(self, scheduled: list[ScheduledRequest], padded: int,
                        samples: bool = True) -> None:
        """Write a pure decode step's inputs where the graphs read them (see
        ``vserve.worker.cuda_graphs``) with one host→device copy. Padded rows: token 0 at
        position 0, slot 0 of the null block, one token of context, a table row of zeros."""
        assert self.graphs is not None
        bs = self.block_size
        mb = self.graphs.max_batch_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        width = 1
        for s in scheduled:
            req = s.request
            p = req.num_computed_tokens
            q, r = divmod(p, bs)
            ids.append(req.all_token_ids[p])
            positions.append(p)
            slots.append(s.block_ids[q] * bs + r)
            seq_lens.append(p + 1)
            if q >= width:
                width = q + 1
        n = len(scheduled)
        table: list[int] = []
        self._block_table_rows(scheduled, width, table)
        off = table_offset(mb)
        end = off + padded * width
        if not self._host_free:
            self._copied.synchronize()
        h = self._host_np
        h[0:n] = ids
        h[mb : mb + n] = positions
        h[2 * mb : 2 * mb + n] = slots
        h[3 * mb : 3 * mb + n] = seq_lens
        if padded > n:
            h[n:padded] = 0
            h[mb + n : mb + padded] = 0
            h[2 * mb + n : 2 * mb + padded] = 0
            h[3 * mb + n : 3 * mb + padded] = 1
            h[off + n * width : end] = 0
        h[4 * mb] = width
        h[off : off + n * width] = table
        self._stage[:end].copy_(self._host[:end], non_blocking=True)
        self._after_upload(samples)

    # ---- one step --------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledRequest]) -> tuple[
        torch.Tensor, torch.Tensor, AttentionMetadata
    ]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        max_blocks = 0
        for s in scheduled:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            end = start + n
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            max_blocks = max(max_blocks, math.ceil(end / bs))
        table = [s.block_ids[:max_blocks] + [0] * (max_blocks - min(len(s.block_ids), max_blocks))
                 for s in scheduled]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.tensor(table, dtype=torch.int32).to(dev, non_blocking=True),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.finished_request_ids:
            self.sampler.forget(sched.finished_request_ids)
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        if self.skip_compute:
            return self._fake_step(sched)
        scheduled = sched.scheduled
        self._graph_argmax: torch.Tensor | None = None
        if self.is_cuda:
            hidden, logits, row0 = self._forward_cuda(scheduled)
        else:
            ids, pos, meta = self._prepare(scheduled)
            hidden = self.model(ids, pos, self.kv_caches, meta)
            row0 = meta.query_start_loc_cpu
            logits = None
            sampling = [i for i, s in enumerate(scheduled) if s.samples]
            if sampling:
                rows = torch.tensor([row0[i + 1] - 1 for i in sampling], device=hidden.device)
                logits = self.model.compute_logits(hidden[rows])

        if logits is not None:
            reqs = [s.request for s in scheduled if s.samples]
            greedy = self._graph_argmax
            if greedy is not None and Sampler.plain_greedy(reqs):
                # The graph already took the argmax: one device→host copy.
                result = SamplerOutput(greedy.tolist(), [None] * len(reqs))
            else:
                result = self.sampler(logits, reqs)
            # The sampled ids came back to the host: the stream is idle, uploads are done.
            self._host_free = self.is_cuda
            for req, tok, lp in zip(reqs, result.sampled, result.logprobs):
                out.sampled_token_ids[req.request_id] = tok
                if lp is not None:
                    out.logprobs[req.request_id] = lp

        for i, s in enumerate(scheduled):
            if s.request.sampling_params.prompt_logprobs is not None:
                lp = self._prompt_logprobs(s, hidden, row0[i])
                if lp is not None:
                    out.prompt_logprobs[s.request.request_id] = lp
        return out

    def _forward_cuda(self, scheduled: list[ScheduledRequest]) -> tuple[
        torch.Tensor, torch.Tensor | None, list[int]
    ]:
        """``(hidden rows of the step, logits of the sampling rows or None, query starts)``."""
        n = len(scheduled)
        graphs = self.graphs
        if graphs is not None and all(s.num_new_tokens == 1 for s in scheduled):
            padded = graphs.padded_size(n)
            if padded is not None:
                samples = [s.samples for s in scheduled]
                self._prepare_decode(scheduled, padded, any(samples))
                hidden, all_logits = graphs.replay(padded)
                logits: torch.Tensor | None = None
                if all(samples):
                    logits = all_logits[:n]
                    self._graph_argmax = graphs.argmax[:n]
                elif any(samples):
                    idx = [i for i, x in enumerate(samples) if x]
                    logits = all_logits[torch.tensor(idx, device=self.device)]
                return hidden[:n], logits, list(range(n + 1))
        ids, pos, meta, rows = self._prepare_cuda(scheduled)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if rows is None:
            return hidden, None, meta.query_start_loc_cpu
        return hidden, self.model.compute_logits(hidden[rows]), meta.query_start_loc_cpu

    def _fake_step(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Benchmark mode: a deterministic token per sampling request, never an EOS or
        special id below 32, and logprob rows of 0.0 where asked, with no arithmetic."""
        out = ModelRunnerOutput()
        vocab = self.arch.vocab_size
        for s in sched.scheduled:
            req = s.request
            if not s.samples:
                continue
            tok = min(vocab - 1, 32 + (req.num_tokens * 7) % 64)
            while tok in req.eos_token_ids and tok > 0:
                tok -= 1
            out.sampled_token_ids[req.request_id] = tok
            k = req.sampling_params.logprobs
            if k is not None:
                out.logprobs[req.request_id] = Logprobs([[tok] * (k + 1)], [[0.0] * (k + 1)],
                                                        [1])
        return out

    def _prompt_logprobs(
        self, s: ScheduledRequest, hidden: torch.Tensor, row0: int
    ) -> Logprobs | None:
        """Logprobs of prompt tokens ``c+1 .. min(c+n, P-1)`` from this chunk's hidden rows.

        ``request.num_prompt_logprobs_done`` (the last target position sent) keeps a
        recomputed (preempted) request from sending a position twice.
        """
        req = s.request
        c, n, p = req.num_computed_tokens, s.num_new_tokens, req.num_prompt_tokens
        first = max(c + 1, req.num_prompt_logprobs_done + 1)
        last = min(c + n, p - 1)
        if first > last:
            return None
        rows = torch.arange(row0 + first - 1 - c, row0 + last - c, device=hidden.device)
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
        targets = torch.tensor(req.prompt_token_ids[first : last + 1], device=hidden.device)
        num_top = req.sampling_params.prompt_logprobs or 0
        req.num_prompt_logprobs_done = last
        return gather_logprobs(logprobs, targets, num_top)
