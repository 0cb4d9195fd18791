"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

It owns the model, the paged KV cache tensors and the sampler. Inputs are built on the host
as flat lists and moved to the device in one copy per tensor, so the same code serves the
CPU and CUDA paths; the attention backend is chosen by device.
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
from vserve.worker.attention.backend import AttentionBackend, AttentionMetadata
from vserve.worker.sampler import Sampler, gather_logprobs

logger = logging.getLogger(__name__)


def select_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def select_attention_backend(device: torch.device) -> AttentionBackend:
    # The Triton backend lives in vserve.ops and is imported only on CUDA.
    from vserve.worker.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()


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
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks + 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * cache.gpu_memory_utilization) - used
        else:
            budget = cache.kv_cache_memory_bytes
        num = budget // self.bytes_per_block()
        needed = math.ceil(self.max_model_len / self.block_size)
        if num < needed:
            raise ValueError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num} blocks of "
                f"{self.block_size} tokens, fewer than one sequence of max_model_len="
                f"{self.max_model_len} needs ({needed}); raise the KV cache memory or lower "
                "max_model_len"
            )
        return int(num) + 1

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
        ids, pos, meta = self._prepare(sched.scheduled)
        hidden = self.model(ids, pos, self.kv_caches, meta)

        sampling = [i for i, s in enumerate(sched.scheduled) if s.samples]
        if sampling:
            rows = torch.tensor([meta.query_start_loc_cpu[i + 1] - 1 for i in sampling],
                                device=hidden.device)
            logits = self.model.compute_logits(hidden[rows])
            reqs = [sched.scheduled[i].request for i in sampling]
            result = self.sampler(logits, reqs)
            for req, tok, lp in zip(reqs, result.sampled, result.logprobs):
                out.sampled_token_ids[req.request_id] = tok
                if lp is not None:
                    out.logprobs[req.request_id] = lp

        for i, s in enumerate(sched.scheduled):
            if s.request.sampling_params.prompt_logprobs is not None:
                lp = self._prompt_logprobs(s, hidden, meta.query_start_loc_cpu[i])
                if lp is not None:
                    out.prompt_logprobs[s.request.request_id] = lp
        return out

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
