"""Sizing the KV cache: how many blocks fit the memory budget.

CPU: the configured ``kv_cache_memory_bytes``. CUDA: ``gpu_memory_utilization`` of the card
less what is in use after loading the weights, less the activation peak of a profiling
forward pass over a full token budget, less the CUDA graphs' persistent buffers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from vserve.attention.backend import AttentionMetadata
from vserve.logging_utils import get_logger
from vserve.worker.mixed_graphs import MAX_MIXED_GRAPH_TOKENS

if TYPE_CHECKING:
    from vserve.worker.model_runner import ModelRunner

logger = get_logger(__name__)


def determine_num_blocks(runner: ModelRunner) -> int:
    """Blocks that fit the memory budget (+1 for the reserved null block 0)."""
    cache = runner.config.cache
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks + 1
    if runner.device.type == "cuda":
        budget = profile_cuda_budget(runner)
    else:
        budget = cache.kv_cache_memory_bytes
    num = budget // runner.bytes_per_block()
    needed = math.ceil(runner.max_model_len / runner.block_size)
    if num < needed:
        raise ValueError(
            f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num} blocks of "
            f"{runner.block_size} tokens, fewer than one sequence of max_model_len="
            f"{runner.max_model_len} needs ({needed}); raise the KV cache memory or lower "
            "max_model_len"
        )
    return int(num) + 1


def profile_cuda_budget(runner: ModelRunner) -> int:
    """Bytes for the KV cache: ``gpu_memory_utilization`` of the card, less what is in
    use now (weights, CUDA context, other processes), less the activation peak of a
    profiling forward pass over a full token budget (logits and sampling of
    ``max_num_seqs`` rows included), less the CUDA graphs' persistent buffers."""
    cache = runner.config.cache
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(runner.device)
    activation_peak = 0
    if not runner.skip_compute:
        torch.cuda.reset_peak_memory_stats(runner.device)
        scratch = profile_run(runner)
        torch.cuda.synchronize(runner.device)
        activation_peak = max(0, torch.cuda.max_memory_allocated(runner.device) - weights - scratch)
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(runner.device)
    used = total - free
    graph_reserve = 0
    if runner.is_cuda and not runner.config.device.enforce_eager:
        bs = runner.graph_batch_size()
        graph_reserve = (
            bs * runner.arch.vocab_size * torch.tensor([], dtype=runner.dtype).element_size()
            + bs * (runner.max_blocks_per_seq + 5) * 4
            + (64 << 20)
        )
        if runner.config.device.mixed_step_graphs:
            # The mixed-step graphs keep the intermediates of a forward of up to
            # MAX_MIXED_GRAPH_TOKENS tokens in their pool, next to what eager steps use.
            share = min(1.0, MAX_MIXED_GRAPH_TOKENS / runner.config.scheduler.max_num_batched_tokens)
            graph_reserve += int(activation_peak * share)
    budget = int(total * cache.gpu_memory_utilization) - used - activation_peak - graph_reserve
    logger.info(
        "GPU memory: %.2f GiB total, %.2f GiB in use after loading (weights %.2f GiB), "
        "activation peak %.2f GiB, CUDA-graph buffers %.2f GiB → KV cache budget %.2f GiB "
        "at gpu_memory_utilization=%.2f",
        total / 2**30,
        used / 2**30,
        weights / 2**30,
        activation_peak / 2**30,
        graph_reserve / 2**30,
        budget / 2**30,
        cache.gpu_memory_utilization,
    )
    return budget


@torch.inference_mode()
def profile_run(runner: ModelRunner) -> int:
    """A forward pass over ``max_num_batched_tokens`` dummy tokens (in sequences of up to
    ``max_model_len``), logits and log-softmax/sort of ``max_num_seqs`` rows; returns the
    bytes of the scratch KV cache it used (not part of the activation peak)."""
    sc = runner.config.scheduler
    num_tokens = max(1, min(sc.max_num_batched_tokens, sc.max_num_seqs * runner.max_model_len))
    seq_len = min(runner.max_model_len, num_tokens)
    lens = [seq_len] * (num_tokens // seq_len)
    if num_tokens % seq_len:
        lens.append(num_tokens % seq_len)
    bs = runner.block_size
    nblocks = [math.ceil(n / bs) for n in lens]
    shape = (sum(nblocks) + 1, bs, runner.arch.num_key_value_heads, runner.arch.head_dim)
    caches = [
        (
            torch.zeros(shape, dtype=runner.kv_dtype, device=runner.device),
            torch.zeros(shape, dtype=runner.kv_dtype, device=runner.device),
        )
        for _ in range(runner.arch.num_hidden_layers)
    ]
    scratch = 2 * len(caches) * math.prod(shape) * caches[0][0].element_size()
    tables: list[list[int]] = []
    slots: list[int] = []
    positions: list[int] = []
    first = 1
    for n, nb in zip(lens, nblocks):
        table = list(range(first, first + nb))
        first += nb
        tables.append(table + [0] * (max(nblocks) - nb))
        slots.extend(table[p // bs] * bs + p % bs for p in range(n))
        positions.extend(range(n))
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    dev = runner.device
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )
    ids = torch.randint(0, runner.arch.vocab_size, (num_tokens,), dtype=torch.int32, device=dev)
    pos = torch.tensor(positions, dtype=torch.int32, device=dev)
    hidden = runner.model(ids, pos, caches, meta)
    rows = min(sc.max_num_seqs, num_tokens)
    logits = runner.model.compute_logits(hidden[:rows])
    logprobs = torch.log_softmax(logits, dim=-1)
    sorted_logits = logits.sort(dim=-1, descending=True)
    del hidden, logits, logprobs, sorted_logits, caches
    return scratch
