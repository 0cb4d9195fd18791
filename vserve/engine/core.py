"""EngineCore: the scheduler, the KV cache and the model runner, stepped in one thread.

``step()`` is one iteration of the busy loop: schedule → run the model → update requests →
outputs grouped by the front end (client_index) that owns each request.

With async scheduling, ``step()`` also launches the next step before it waits for this
one's tokens (``Scheduler.schedule_chained``), so the GPU never idles while the host reads
results, updates requests and schedules. Churn does not break the chain: requests that
arrived join the next step as prefill rows, and a request that stops or is aborted while its
next row is in flight only wastes that row. Steps whose sampling reads the output history
(grammars, penalties, a pending ``min_tokens``) chain too: their forward pass is launched
ahead and their sampling deferred until the step before is applied (``PendingOutput.sample``),
so the host's bitmask and update work overlaps the GPU's forward pass. The chain stops (the
step in flight is finished and the next one scheduled from the updated state) only when
blocks run out; ``schedule()`` only ever runs with nothing in flight, so preemption never
meets a step in flight. The process shell
around it (sockets, threads) lives in ``core_proc.py``; tests and benchmarks can drive this
class directly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

from vserve.config import EngineConfig
from vserve.core.request import Request
from vserve.core.sched_output import SchedulerOutput
from vserve.core.scheduler import Scheduler
from vserve.protocol.outputs import (
    EngineCoreOutputs,
    FinishedRequest,
    FinishReason,
    SchedulerStats,
)
from vserve.protocol.requests import EngineCoreRequest
from vserve.structured.matcher import StructuredOutputs
from vserve.worker.model_runner import ModelRunner
from vserve.worker.pending import PendingOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, model_dir: Path, engine_index: int = 0) -> None:
        self.config = config
        self.engine_index = engine_index
        t0 = time.perf_counter()
        tp = None
        if config.device.tensor_parallel_size > 1:
            from vserve.engine.tp_worker import start_workers

            tp = start_workers(config, model_dir, engine_index)
        self.runner = ModelRunner(config, model_dir, tp)
        t_load = time.perf_counter()
        self.num_kv_blocks = self.runner.determine_num_blocks()
        t_profile = time.perf_counter()
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        t_cache = time.perf_counter()
        phases = (f"model load {t_load - t0:.1f}s, memory profiling {t_profile - t_load:.1f}s,"
                  f" KV cache{' + CUDA graphs' if self.runner.graphs is not None else ''} "
                  f"{t_cache - t_profile:.1f}s")
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.arch.vocab_size
        self.scheduler = Scheduler(
            config.scheduler, config.cache, self.num_kv_blocks, self.max_model_len,
            engine_index)
        # Async scheduling by default where it pays: on the GPU (host work hides behind the
        # step in flight). On CPU it works the same way but gains nothing.
        requested = config.scheduler.async_scheduling
        self.async_scheduling = self.runner.is_cuda if requested is None else requested
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None
        self.structured: StructuredOutputs | None = None  # made at the first constrained request
        self._compiling: list[tuple[Request, Future[Any]]] = []
        usable = self.num_kv_blocks - 1  # block 0 is the reserved null block
        self.max_concurrency = usable * config.cache.block_size / self.max_model_len
        logger.info(
            "engine %d ready in %.1fs (%s): %s on %s (%s), %d KV blocks of %d tokens "
            "(%.1f MiB, %s), max_model_len %d, max concurrency %.2fx at that length, "
            "async scheduling %s",
            engine_index, time.perf_counter() - t0, phases, self.runner.arch.architecture,
            self.runner.device, str(self.runner.dtype).removeprefix("torch."), usable,
            config.cache.block_size, usable * self.runner.bytes_per_block() / 2**20,
            self.cache_info()["cache_dtype"], self.max_model_len, self.max_concurrency,
            "on" if self.async_scheduling else "off",
        )

    def cache_info(self) -> dict[str, str]:
        """The KV cache as ``vserve_cache_config_info`` labels it."""
        cache = self.config.cache
        return {"block_size": str(cache.block_size),
                "cache_dtype": str(self.runner.kv_dtype).removeprefix("torch."),
                "num_gpu_blocks": str(self.num_kv_blocks - 1),
                "enable_prefix_caching": str(cache.enable_prefix_caching).lower()}

    # ---- requests in ---------------------------------------------------------------
    def validate(self, req: EngineCoreRequest) -> str | None:
        """Why this request cannot run here, or None. Front ends check first; this guards."""
        n = len(req.prompt_token_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.max_model_len:
            return (f"the prompt has {n} tokens; this model's context window is "
                    f"{self.max_model_len} tokens, so at most {self.max_model_len - 1} fit "
                    "with one generated token")
        ids = req.prompt_token_ids
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # builtins: no Python loop
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            return f"token id {bad} is out of the vocabulary (size {self.vocab_size})"
        return None

    def add_request(self, req: EngineCoreRequest) -> FinishedRequest | None:
        """Queue a request; returns its error ending instead when it cannot run.

        A request with a structured-output constraint waits in ``_compiling`` until its
        grammar is compiled on the compile thread; only then does the scheduler see it."""
        error = self.validate(req)
        if error is None:
            try:
                request = Request.from_engine_core_request(req)
                so = req.sampling_params.structured
                if so is None:
                    self.scheduler.add_request(request)
                    return None
                if request.request_id in self.scheduler.requests or any(
                        r.request_id == request.request_id for r, _ in self._compiling):
                    raise ValueError(f"request id {request.request_id!r} is already in use")
                if self.structured is None:
                    self.structured = StructuredOutputs(
                        self.runner.model_dir, self.vocab_size, list(req.eos_token_ids))
                self._compiling.append((request, self.structured.submit(so)))
                return None
            except ValueError as e:  # e.g. a duplicate id: refuse it, never die of it
                error = str(e)
        return FinishedRequest(req.request_id, FinishReason.ERROR, error=error)

    def _admit_compiled(self, wait: bool) -> dict[int, EngineCoreOutputs]:
        """Move requests whose grammar is ready into the scheduler; a grammar that failed
        to compile ends its request with an error. ``wait``: nothing else to do, so block
        briefly for the first one instead of spinning."""
        if wait:
            futures_wait([f for _, f in self._compiling], timeout=0.01,
                         return_when=FIRST_COMPLETED)
        out: dict[int, EngineCoreOutputs] = {}
        still = []
        for request, future in self._compiling:
            if not future.done():
                still.append((request, future))
                continue
            try:
                request.grammar = future.result()
                self.scheduler.add_request(request)
                continue
            except Exception as e:  # noqa: BLE001 - any compile failure ends the request
                error = str(e) or type(e).__name__
            outs = out.get(request.client_index)
            if outs is None:
                outs = out[request.client_index] = EngineCoreOutputs(self.engine_index)
                outs.finished = []
            outs.finished.append(FinishedRequest(request.request_id, FinishReason.ERROR,
                                                 error=error))
        self._compiling = still
        return out

    def abort_requests(self, request_ids: list[str]) -> dict[int, EngineCoreOutputs]:
        """Abort; returns each affected front end's outputs announcing the aborts."""
        out: dict[int, EngineCoreOutputs] = {}
        aborted = list(self.scheduler.abort_requests(request_ids))
        if self._compiling:
            gone = set(request_ids)
            aborted += [r for r, _ in self._compiling if r.request_id in gone]
            self._compiling = [(r, f) for r, f in self._compiling if r.request_id not in gone]
        for req in aborted:
            outs = out.get(req.client_index)
            if outs is None:
                outs = out[req.client_index] = EngineCoreOutputs(self.engine_index)
                outs.finished = []
            outs.finished.append(FinishedRequest(req.request_id, FinishReason.ABORT))
        return out

    def abort_client(self, client_index: int) -> int:
        """Drop every request of a front end that went away; returns how many."""
        ids = self.scheduler.request_ids_of_client(client_index)
        self.scheduler.abort_requests(ids)
        held = len(self._compiling)
        self._compiling = [(r, f) for r, f in self._compiling if r.client_index != client_index]
        return len(ids) + held - len(self._compiling)

    # ---- the loop body ---------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """Requests to run, or a step in flight whose results are not applied yet."""
        return (self._in_flight is not None or self.scheduler.has_unfinished_requests()
                or bool(self._compiling))

    def step(self) -> dict[int, EngineCoreOutputs]:
        if self._compiling:
            failed = self._admit_compiled(
                wait=self._in_flight is None and not self.scheduler.has_unfinished_requests())
            if failed:
                return failed
        if self._in_flight is None:
            sched = self.scheduler.schedule()
            pending = self.runner.execute_model_async(sched)
        else:
            sched, pending = self._in_flight
            self._in_flight = None
        # The next step is built before this one samples: it does not depend on the draw,
        # and a deferred step's sampling may first wait for its grammar bitmasks.
        chained = (self.scheduler.schedule_chained(sched)
                   if self.async_scheduling and pending.chainable else None)
        # A deferred step samples now that the step before it is applied (its grammars and
        # penalties see that step's tokens); its forward ran meanwhile.
        pending.sample()
        if chained is not None:
            self._in_flight = (chained, self.runner.execute_model_async(chained, pending))
        # Once its grammars have seen this step's tokens, the chained step's bitmasks can
        # be filled while this step is applied, its outputs sent and the next step() begins.
        chained_prepare = self._in_flight[1].prepare if self._in_flight is not None else None
        return self.scheduler.update_from_output(sched, pending.result(), chained_prepare)

    def stats(self) -> SchedulerStats:
        return self.scheduler.get_stats()
