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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vserve.attention.backend import AttentionBackend, AttentionMetadata
from vserve.config import EngineConfig
from vserve.core.request import Request
from vserve.core.sched_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from vserve.models.arch import ModelArchConfig, load_arch_config
from vserve.models.fp8 import check_fp8_device
from vserve.models.loader import load_model, resolve_dtype
from vserve.models.quant_config import resolve_quantization
from vserve.ops.tiles import prefill_block_m
from vserve.protocol.outputs import Logprobs
from vserve.worker import kv_sizing
from vserve.worker.block_table import BatchRows
from vserve.worker.cuda_graphs import DecodeGraphs, table_offset
from vserve.worker.cuda_inputs import DEVICE_TOKEN, CudaInputs, input_token, mixed_order
from vserve.worker.fake_compute import SimulatedDevice, fake_step
from vserve.worker.mixed_graphs import MAX_MIXED_GRAPH_TOKENS, MixedGraphs, MixedLayout
from vserve.worker.pending import PendingOutput
from vserve.worker.sampler import Sampler, SamplingInputs, gather_logprobs

if TYPE_CHECKING:  # torch.distributed is imported only by tensor-parallel engines
    from vserve.worker.tensor_parallel import TensorParallel

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
        from vserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from vserve.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()


MAX_GRAPH_BATCH_SIZE = 256


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path,
                 tp: TensorParallel | None = None) -> None:
        """``tp``: this process's tensor-parallel group when ``tensor_parallel_size`` > 1
        (rank 0 here announces every forward pass and logits computation to the other
        ranks, see ``vserve.worker.tensor_parallel``)."""
        self.config = config
        self.model_dir = model_dir
        self.tp = tp
        self.device = select_device(config.device.device)
        if config.device.tensor_parallel_size > 1:  # checked: check_tensor_parallel
            assert tp is not None and tp.size == config.device.tensor_parallel_size
        self.arch: ModelArchConfig = load_arch_config(model_dir)
        self.dtype = resolve_dtype(self.arch, config.model.dtype, self.device)
        self.quantization = resolve_quantization(config.model.quantization,
                                                 self.arch.quantization)
        if self.quantization is not None:
            check_fp8_device(self.device)
        self.block_size = config.cache.block_size
        self.max_model_len = self._max_model_len()
        self.attn_backend = select_attention_backend(self.device)
        # Storage only: attention widens float8 keys and values to ``dtype`` as it reads them.
        self.kv_dtype = torch.float8_e4m3fn if config.cache.kv_cache_fp8 else self.dtype
        if config.cache.kv_cache_fp8:
            check_fp8_device(self.device, "a float8 KV cache (kv_cache_dtype fp8)")
        elif self.quantization is not None and self.quantization.kv_cache_scales:
            logger.info("the checkpoint's KV-cache scales (kv_cache_scheme) apply to a float8 "
                        "cache only: pass --kv-cache-dtype fp8 to use them")
        self.skip_compute = config.device.benchmark_skip_compute
        self.fake_device = (SimulatedDevice(config.device.benchmark_step_ms / 1e3)
                            if self.skip_compute and config.device.benchmark_step_ms else None)
        self.model: Any = None
        if self.skip_compute:
            logger.warning("BENCHMARK MODE: the model is not loaded and outputs are fake "
                           "tokens; use this only to measure the front end")
        else:
            self.model = load_model(model_dir, self.arch, self.dtype, self.device,
                                    self.attn_backend, tp, self.quantization)
        self.sampler = Sampler(self.device, config.model.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.is_cuda = self.device.type == "cuda" and not self.skip_compute
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        self.inputs: CudaInputs | None = None
        # Every request in the batch holds a persistent row from its first step until the
        # step that reports it finished or preempted: its block ids (both devices) and, on
        # CUDA, its last sampled token on the device (see CudaInputs). Chaining can hold a
        # finished request's row one step longer, hence twice the sequences.
        max_rows = 2 * max(config.scheduler.max_num_seqs, self.graph_batch_size())
        # Rank 0 of a tensor-parallel group records its block-table changes: the workers
        # replay them on their mirrors (only changes cross per step).
        self.batch_rows = BatchRows(max_rows, self.max_blocks_per_seq,
                                    record=tp is not None and tp.rank == 0)
        if self.is_cuda:
            sc = config.scheduler
            gbs = self.graph_batch_size()
            max_tokens = max(sc.max_num_batched_tokens, gbs)
            max_seqs = max(sc.max_num_seqs, gbs)
            # ids, positions, slots, token rows (tokens); query starts, seq lens, sample rows
            # and their row ids (seqs); table; alignment padding of each segment — or the
            # graphs' layout.
            self.mixed_layout = MixedLayout(
                max_tokens=min(sc.max_num_batched_tokens, MAX_MIXED_GRAPH_TOKENS),
                max_seqs=gbs,
                block_m=prefill_block_m(self.dtype, self.arch.head_dim),
                max_blocks_per_seq=self.max_blocks_per_seq)
            size = max(4 * max_tokens + 4 * max_seqs + 1 + max_seqs * self.max_blocks_per_seq
                       + 8 * 16, table_offset(gbs) + gbs * self.max_blocks_per_seq,
                       self.mixed_layout.size)
            self.inputs = CudaInputs(size, gbs, max_rows, self.device)

    def shutdown(self) -> None:
        """Let the other tensor-parallel ranks leave (they would otherwise wait for the next
        call until they notice this process is gone)."""
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send_exit()
            self.tp.close()

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
    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches (all of them without tensor parallelism)."""
        return self.model.layout.num_kv_heads if self.tp is not None else \
            self.arch.num_key_value_heads

    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        per_token = self.arch.kv_cache_bytes_per_token(elem)
        return per_token * self.num_kv_heads // self.arch.num_key_value_heads * self.block_size

    def determine_num_blocks(self) -> int:
        """Blocks that fit the memory budget (+1 for the reserved null block 0)."""
        return kv_sizing.determine_num_blocks(self)

    def graph_batch_size(self) -> int:
        return min(self.config.scheduler.max_num_seqs, MAX_GRAPH_BATCH_SIZE)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        if self.skip_compute:
            return  # nothing reads or writes the cache in benchmark mode
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send_alloc(num_blocks)
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.arch.head_dim)
        # CPU: empty, not zeros — attention reads only slots it wrote, and untouched pages
        # cost no resident memory (a 1 GiB budget for a tiny model stays virtual).
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        self.kv_caches = [
            (
                alloc(shape, dtype=self.kv_dtype, device=self.device),
                alloc(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in range(self.arch.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        if (self.inputs is not None and not self.config.device.enforce_eager
                and self.attn_backend.supports_decode_graphs):
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, self.graph_batch_size(), self.max_blocks_per_seq,
                self.arch.vocab_size, self.device, self.inputs.stage, self.inputs.last_tokens,
                logits_dtype=self.dtype)
            self.graphs.capture()
            if self.config.device.mixed_step_graphs:
                self.mixed_graphs = MixedGraphs(
                    self.model, self.kv_caches, self.mixed_layout, self.arch.vocab_size,
                    self.device, self.inputs.stage, self.inputs.last_tokens,
                    pool=self.graphs.pool, logits=self.graphs.logits)
                self.mixed_graphs.capture()

    # ---- one step --------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledRequest],
                 overrides: dict[str, int] | None) -> tuple[
        torch.Tensor, torch.Tensor, AttentionMetadata
    ]:
        """CPU inputs: token ids from the requests; positions, slots and block table from
        the rows' query and sequence lengths and the persistent rows (``BatchRows``)."""
        rows = self._batch_rows(scheduled)
        input_ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        for s in scheduled:
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens + s.num_ahead
            end = start + n
            if n == 1:
                tok = input_token(s, start, overrides)
                assert tok != DEVICE_TOKEN, "a chained CPU step needs the previous tokens"
                input_ids.append(tok)
                positions.append(start)
            else:
                input_ids.extend(req.all_token_ids[start:end])
                positions.extend(range(start, end))
            qsl.append(end - start + qsl[-1])
            seq_lens.append(end)
        ids = torch.tensor(input_ids, dtype=torch.int64)
        if self.tp is not None:
            self.tp.send_forward(ids, rows, qsl, seq_lens,
                                 self.batch_rows.block_table.take_journal())
        pos, meta = self.step_metadata(np.asarray(rows, dtype=np.int64), qsl, seq_lens,
                                       np.asarray(positions, dtype=np.int64))
        return ids, pos, meta

    def step_metadata(self, rows: np.ndarray, qsl: list[int], seq_lens: list[int],
                      positions: np.ndarray | None = None,
                      ) -> tuple[torch.Tensor, AttentionMetadata]:
        """A CPU step's positions and attention metadata from its rows (int64), query
        start offsets and sequence lengths: sequence i's new tokens sit at positions
        ``seq_lens[i] - q_i .. seq_lens[i] - 1`` (derived here unless ``positions`` is
        given: rank 0 has them from its loop, tensor-parallel workers derive them from
        what rank 0 sends)."""
        bs = self.block_size
        qlens = np.diff(qsl)
        pos_np = positions
        if pos_np is None:
            starts = np.asarray(qsl, dtype=np.int64)
            first = np.asarray(seq_lens, dtype=np.int64) - qlens
            # Each token: its sequence's first new position + its index in the query.
            pos_np = np.repeat(first - starts[:-1], qlens) + np.arange(qsl[-1],
                                                                       dtype=np.int64)
        table = self.batch_rows.block_table
        slots = table.slots(np.repeat(rows, qlens), pos_np, bs)
        width = -(-max(seq_lens) // bs)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.from_numpy(table.gather(rows, width)),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return torch.from_numpy(pos_np), meta

    def execute_model_async(self, sched: SchedulerOutput,
                            in_flight: PendingOutput | None = None) -> PendingOutput:
        """Launch one step; its output may still be on the device when this returns.

        A chained step (``sched.chained``) is launched while ``in_flight``, the step before
        it, still runs. Tokens it needs from that step are taken from its result when the
        host has it already, else (CUDA) gathered on the device from ``last_tokens``, so
        nothing waits for the step in flight.
        """
        if sched.finished_request_ids:
            self._release_rows(sched.finished_request_ids)
        if sched.preempted_request_ids:
            self._release_rows(sched.preempted_request_ids)
        if sched.is_empty:
            return PendingOutput(ModelRunnerOutput())
        if self.skip_compute:
            return fake_step(sched, self.arch.vocab_size, self.sampler, self.fake_device)
        scheduled = sched.scheduled
        overrides: dict[str, int] | None = None
        if sched.chained:
            assert in_flight is not None and not in_flight.is_deferred, \
                "sample() the step in flight before chaining onto it"
            if in_flight.ready or not self.is_cuda:
                overrides = in_flight.result().sampled_token_ids
        if self.is_cuda:
            return self._execute_cuda(scheduled, overrides)
        ids_t, pos, meta = self._prepare(scheduled, overrides)
        hidden = self.model(ids_t, pos, self.kv_caches, meta)
        row0 = meta.query_start_loc_cpu
        logits = None
        sampling = [i for i, s in enumerate(scheduled) if s.sample]
        if sampling:
            rows = torch.tensor([row0[i + 1] - 1 for i in sampling], device=hidden.device)
            logits = self._logits(hidden, rows)
        return self._finish(scheduled, hidden, logits, row0)

    def _logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden[rows]`` (the other tensor-parallel ranks compute them too)."""
        if self.tp is not None:
            self.tp.send_logits(rows)
        return self.model.compute_logits(hidden[rows])

    # ---- persistent rows ----------------------------------------------------------------
    def _batch_rows(self, scheduled: list[ScheduledRequest]) -> list[int]:
        return self.batch_rows.rows_for([s.request.request_id for s in scheduled],
                                        [s.block_ids for s in scheduled])

    def _release_rows(self, request_ids: set[str] | list[str]) -> None:
        self.batch_rows.release(request_ids)

    def _finish(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor | None,
                logits: torch.Tensor | None, row0: list[int],
                upload: int | None = None) -> PendingOutput:
        """The step's output: prompt logprobs now, tokens sampled from ``logits`` (the
        sampling rows', in order) now — or deferred until the engine has applied the step
        before this one (``PendingOutput.deferred``) when sampling reads the output history
        (grammars, penalties, ``min_tokens``), and on CUDA always (steps reach this host
        sampler there only for logprobs or prompt logprobs; the others sample on the device,
        ``_sample_on_device``): sampling waits for the forward pass, and deferred, that wait
        comes after the host has applied the step before (while this step runs) rather than
        before. ``upload``: the step's input upload, known complete once its tokens are on
        the host."""
        out = ModelRunnerOutput()
        for i, s in enumerate(scheduled):
            if s.request.sampling_params.prompt_logprobs is not None:
                lp = self._prompt_logprobs(s, hidden, row0[i])
                if lp is not None:
                    out.prompt_logprobs[s.request.request_id] = lp
        reqs = [s.request for s in scheduled if s.sample]
        inputs = self.inputs

        def sample() -> ModelRunnerOutput:
            if logits is not None:
                result = self.sampler(logits, reqs)
                for req, tok, lp in zip(reqs, result.sampled, result.logprobs):
                    out.sampled_token_ids[req.request_id] = tok
                    if lp is not None:
                        out.logprobs[req.request_id] = lp
                if upload is not None and inputs is not None:
                    # The sampled ids came back to the host: the stream has passed the upload.
                    inputs.completed(upload)
            return out

        if logits is None or (not self.is_cuda and Sampler.history_free(reqs)):
            return PendingOutput(sample(), chainable=True)
        return PendingOutput.deferred(sample)

    def _graph_size(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The captured graph size a pure decode step of these rows replays, or None."""
        if self.graphs is None or any(s.num_new_tokens != 1 for s in scheduled):
            return None
        return self.graphs.padded_size(len(scheduled))

    def _mixed_size(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The token count of the mixed-step graph these rows replay, or None (eager).

        Prompt logprobs need every row's hidden state, which a graph does not keep."""
        if self.mixed_graphs is None:
            return None
        if any(s.request.sampling_params.prompt_logprobs is not None for s in scheduled):
            return None
        tokens = sum(s.num_new_tokens for s in scheduled)
        return self.mixed_graphs.padded_size(tokens, len(scheduled))

    def _execute_cuda(self, scheduled: list[ScheduledRequest],
                      overrides: dict[str, int] | None) -> PendingOutput:
        graphs, inputs = self.graphs, self.inputs
        assert inputs is not None
        n = len(scheduled)
        rows = self._batch_rows(scheduled)
        requests = [s.request for s in scheduled]
        hidden: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        samples = [s.sample for s in scheduled]
        padded = self._graph_size(scheduled)
        if graphs is not None and padded is not None:
            greedy = all(samples) and Sampler.plain_greedy(requests)
            upload = inputs.prepare_decode(scheduled, rows, self.batch_rows.block_table,
                                           padded, self.block_size, any(samples), overrides)
            all_logits = graphs.replay(padded)
            if greedy:
                # The graph's argmax is the output: one device→host copy, not waited for.
                host, event = inputs.read_back(graphs.sampled_ids(n))
                return PendingOutput.on_device([r.request_id for r in requests], host, event,
                                               lambda: inputs.completed(upload))
            sampling = [r for r, x in zip(requests, samples, strict=True) if x]
            step_rows = graphs.small[4, :n]
            if all(samples):
                logits = all_logits[:n]
            elif any(samples):
                idx = torch.tensor([i for i, x in enumerate(samples) if x], device=self.device)
                logits, step_rows = all_logits[idx], step_rows[idx]
            if logits is not None and Sampler.host_free(sampling):
                return self._sample_on_device(sampling, logits, step_rows, upload)
            row0 = list(range(n + 1))
        elif (mixed := self._mixed_size(scheduled)) is not None:
            assert self.mixed_graphs is not None
            mg = self.mixed_graphs
            # One-token rows first: the graph gives them the decode kernel.
            order = mixed_order(scheduled)
            scheduled = [scheduled[i] for i in order]
            upload, n_sample = inputs.prepare_mixed(scheduled, [rows[i] for i in order],
                                                    self.batch_rows.block_table, mg.layout,
                                                    mixed, self.block_size, overrides)
            sampled_logits = mg.replay(mixed, n_sample)
            if n_sample:
                sampling = [s.request for s in scheduled if s.sample]
                if Sampler.plain_greedy(sampling):
                    host, event = inputs.read_back(mg.sampled_ids(n_sample))
                    return PendingOutput.on_device(
                        [r.request_id for r in sampling], host, event,
                        lambda: inputs.completed(upload))
                if Sampler.host_free(sampling):
                    return self._sample_on_device(sampling, sampled_logits,
                                                  mg.sample_rows[:n_sample], upload)
                logits = sampled_logits
            row0 = []  # no prompt logprobs in a graphed step
        else:
            eager = inputs.prepare_eager(scheduled, rows, self.batch_rows.block_table,
                                         self.block_size, overrides)
            upload = eager.upload
            hidden = self.model(eager.input_ids, eager.positions, self.kv_caches,
                                eager.metadata)
            if eager.sample_rows is not None:
                logits = self.model.compute_logits(hidden[eager.sample_rows])
                sampling = [r for r, x in zip(requests, samples, strict=True) if x]
                if (Sampler.host_free(sampling)
                        and not any(r.sampling_params.prompt_logprobs is not None
                                    for r in requests)):
                    assert eager.sample_row_ids is not None
                    return self._sample_on_device(sampling, logits, eager.sample_row_ids,
                                                  upload)
            row0 = eager.metadata.query_start_loc_cpu
        # Once sampled, the host holds this step's tokens: a chained step takes them from
        # here.
        return self._finish(scheduled, hidden, logits, row0, upload)

    def _sample_on_device(self, sampling: list[Request], logits: torch.Tensor,
                          row_ids: torch.Tensor, upload: int) -> PendingOutput:
        """Tokens of ``sampling`` (whose rows of ``last_tokens`` are ``row_ids``, int32 on
        the device, valid until the next step's upload) drawn from ``logits`` on the device:
        recorded in ``last_tokens`` for a chained step and read back without waiting. Now
        when no request's sampling reads its output history, else deferred
        (``PendingOutput.deferred``) until the step before is applied — its host side
        (``Sampler.prepare``: grammar bitmasks filled off the GIL) may start then, through
        ``PendingOutput.prepare`` — either way queued before the next step's upload, as
        ``row_ids`` requires."""
        inputs = self.inputs
        assert inputs is not None

        prepared: list[SamplingInputs] = []

        def prepare() -> None:
            prepared.append(self.sampler.prepare(sampling, logits.shape[1], background=True))

        def launch() -> PendingOutput:
            tokens = self.sampler.sample_on_device(logits, sampling,
                                                   prepared[0] if prepared else None)
            inputs.scatter_last_tokens(row_ids, tokens)
            host, event = inputs.read_back(tokens)
            return PendingOutput.on_device([r.request_id for r in sampling], host, event,
                                           lambda: inputs.completed(upload))

        if Sampler.history_free(sampling):
            return launch()
        return PendingOutput.deferred(launch, prepare)

    def _prompt_logprobs(
        self, s: ScheduledRequest, hidden: torch.Tensor | None, row0: int
    ) -> Logprobs | None:
        """Logprobs of prompt tokens ``c+1 .. min(c+n, P-1)`` from this chunk's hidden rows.

        ``request.num_prompt_logprobs_done`` (the last target position sent) keeps a
        recomputed (preempted) request from sending a position twice.
        """
        req = s.request
        c, n, p = req.num_computed_tokens + s.num_ahead, s.num_new_tokens, req.num_prompt_tokens
        first = max(c + 1, req.num_prompt_logprobs_done + 1)
        last = min(c + n, p - 1)
        if first > last:
            return None
        assert hidden is not None, "prompt rows run eagerly, never in a decode graph"
        rows = torch.arange(row0 + first - 1 - c, row0 + last - c, device=hidden.device)
        logprobs = torch.log_softmax(self._logits(hidden, rows), dim=-1)
        targets = torch.tensor(req.prompt_token_ids[first : last + 1], device=hidden.device)
        num_top = req.sampling_params.prompt_logprobs or 0
        req.num_prompt_logprobs_done = last
        return gather_logprobs(logprobs, targets, num_top)
