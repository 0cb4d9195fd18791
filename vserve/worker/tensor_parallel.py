"""Tensor parallelism inside one engine: the process group and what crosses it per step.

An engine with ``tensor_parallel_size`` T runs T ranks. Rank 0 is the engine process: it
alone holds the scheduler, the KV-cache manager and the sampler. Ranks 1..T-1 are worker
processes (``vserve.engine.tp_worker``) holding only their shard of the weights and of the
KV cache (``vserve.models.llama.ShardLayout``). ``torch.distributed`` joins them — gloo on
CPU — through a rendezvous file in a private temporary directory, so no port is fixed.

Per step rank 0 broadcasts what the other ranks cannot know: the step's token ids, each
sequence's persistent row, query offsets and lengths, and the changes to the rows' block
table since the last step (``BlockTable.journal``). The workers replay those changes on their
mirror of the table and derive positions, slots and the step's block table exactly as rank 0
does (``ModelRunner.step_metadata``). Every rank then runs the same forward pass
(the row-parallel layers all-reduce inside it, and each logits computation all-gathers the
vocabulary shards). Invariant: every collective is entered by all ranks in the same order.
The workers therefore replay exactly the calls rank 0 makes, each announced by a header:
``FORWARD`` (the step's inputs as above), ``LOGITS`` (rows of the last forward's hidden states),
``ALLOC`` (KV-cache blocks) and ``EXIT``.
"""

from __future__ import annotations

from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from vserve.config import EngineConfig


class StepInputs(NamedTuple):
    """A ``FORWARD`` as a worker receives it (see the module docstring)."""

    input_ids: torch.Tensor
    rows: np.ndarray
    qsl: list[int]
    seq_lens: list[int]
    journal: np.ndarray


class Op(IntEnum):
    FORWARD = 1
    LOGITS = 2
    ALLOC = 3
    EXIT = 4


_HEADER = 6  # op and up to five sizes


def check_tensor_parallel(config: EngineConfig, model_dir: Path) -> None:
    """Raise ``ValueError`` naming what stands in the way of ``tensor_parallel_size`` ranks
    (called before any is started): the device, the benchmark mode, the model's sizes."""
    from vserve.models.arch import load_arch_config
    from vserve.models.llama import ShardLayout
    from vserve.worker.model_runner import select_device

    size = config.device.tensor_parallel_size
    if select_device(config.device.device).type != "cpu":
        raise ValueError("tensor_parallel_size > 1 runs on CPU (gloo) only so far; CUDA "
                         "tensor parallelism (NCCL) is not implemented yet")
    if config.device.benchmark_skip_compute:
        raise ValueError("benchmark_skip_compute loads no model: it cannot be combined with "
                         "tensor_parallel_size > 1")
    ShardLayout(load_arch_config(model_dir), 0, size)


class TensorParallel:
    """This process's rank in its engine's tensor-parallel group (``size`` ≥ 2)."""

    def __init__(self, rank: int, size: int, rendezvous: Path) -> None:
        # No timeout that matters: a worker waits in ``receive`` for as long as its engine
        # is idle, and gloo's timeout applies to every collective. A rank that dies is
        # caught by the engine's watch of its workers and by each worker's watch of its
        # parent instead; a start that never completes, by the engine's startup timeout.
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=size, timeout=timedelta(days=365))
        # Past this barrier every rank is through its rendezvous: the file is not read again
        # and rank 0 may delete it.
        dist.barrier()
        self.rank = rank
        self.size = size

    # ---- collectives inside the model ------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (reduced in float32 for narrower dtypes)."""
        if t.dtype in (torch.float32, torch.float64):
            dist.all_reduce(t)
            return t
        wide = t.float()
        dist.all_reduce(wide)
        return t.copy_(wide)

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' ``t`` concatenated along the last dimension, in rank order."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=-1)

    # ---- rank 0: announce each call ------------------------------------------------
    def _send(self, op: Op, *sizes: int, payload: torch.Tensor | None = None) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = int(op)
        header[1 : 1 + len(sizes)] = torch.tensor(sizes, dtype=torch.int64)
        dist.broadcast(header, 0)
        if payload is not None:
            dist.broadcast(payload, 0)

    def send_forward(self, input_ids: torch.Tensor, rows: list[int], qsl: list[int],
                     seq_lens: list[int], journal: np.ndarray) -> None:
        """A step of ``len(rows)`` sequences: token ids, rows, query start offsets, sequence
        lengths and the block-table changes, one int32 broadcast."""
        t, s, j = input_ids.numel(), len(rows), len(journal)
        payload = torch.cat([input_ids.int(), torch.tensor(rows + qsl + seq_lens,
                                                           dtype=torch.int32),
                             torch.from_numpy(journal)])
        self._send(Op.FORWARD, t, s, j, payload=payload)

    def send_logits(self, rows: torch.Tensor) -> None:
        self._send(Op.LOGITS, rows.numel(), payload=rows.long())

    def send_alloc(self, num_blocks: int) -> None:
        self._send(Op.ALLOC, num_blocks)

    def send_exit(self) -> None:
        self._send(Op.EXIT)

    # ---- ranks 1..T-1: receive the next call ----------------------------------------
    def receive(self) -> tuple[Op, Any]:
        """The next call rank 0 made: ``(FORWARD, StepInputs)``, ``(LOGITS, rows)``,
        ``(ALLOC, num_blocks)`` or ``(EXIT, None)``."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        dist.broadcast(header, 0)
        op = Op(int(header[0]))
        if op == Op.FORWARD:
            t, s, j = (int(x) for x in header[1:4])
            payload = torch.empty(t + 3 * s + 1 + j, dtype=torch.int32)
            dist.broadcast(payload, 0)
            rest = payload[t:].numpy()
            return op, StepInputs(
                input_ids=payload[:t].long(), rows=rest[:s].astype(np.int64),
                qsl=rest[s : 2 * s + 1].tolist(), seq_lens=rest[2 * s + 1 : 3 * s + 1].tolist(),
                journal=rest[3 * s + 1 :])
        if op == Op.LOGITS:
            rows = torch.empty(int(header[1]), dtype=torch.int64)
            dist.broadcast(rows, 0)
            return op, rows
        if op == Op.ALLOC:
            return op, int(header[1])
        return op, None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
