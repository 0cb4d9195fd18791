"""Unified (vLLM v1 style) scheduler: one token budget per step, no prefill/decode phases.

Each step gives every request some number of new tokens to compute: a decode gets 1, a
prefill gets a chunk of its prompt, a preempted request recomputes its prompt and outputs.
Running requests are served first, in admission order, then waiting ones.

Invariants between steps:

* ``requests`` holds exactly the unfinished requests; each is in ``running`` (status RUNNING,
  holds blocks) or ``waiting`` (status WAITING or PREEMPTED, holds no blocks), never both.
* A scheduled range never ends past ``max_model_len`` nor past ``request.num_tokens``.
* ``len(running) <= max_num_seqs``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from vserve.config import CacheConfig, SchedulerConfig
from vserve.core.kv_cache_manager import KVCacheManager
from vserve.core.request import Request, RequestStatus
from vserve.core.sched_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from vserve.core.waiting_queue import WaitingQueue
from vserve.protocol.outputs import EngineCoreOutput, RequestTiming, SchedulerStats


class Scheduler:
    """Owns the request queues and the KV cache manager; ``schedule`` and
    ``update_from_output`` alternate, and aborts/adds happen between the two pairs.

    Under FCFS the running list stays in arrival order (preempted requests re-enter waiting
    at the front and are admitted before anything newer), so its last entry is the latest
    arrival: the preemption victim.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_kv_blocks: int,
        max_model_len: int,
    ) -> None:
        capacity = (num_kv_blocks - 1) * cache_config.block_size  # block 0 is the null block
        if max_model_len > capacity:
            # Otherwise a lone request could outgrow the cache and preempt itself forever.
            raise ValueError(
                f"max_model_len ({max_model_len}) exceeds the KV cache capacity ({capacity} "
                f"tokens in {num_kv_blocks - 1} blocks of {cache_config.block_size}); lower "
                "max_model_len or give the KV cache more memory"
            )
        if (
            not scheduler_config.enable_chunked_prefill
            and scheduler_config.max_num_batched_tokens < max_model_len
        ):
            # Without chunking a sequence is computed in one step, so it must fit the budget.
            raise ValueError(
                f"max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) is smaller "
                f"than max_model_len ({max_model_len}) with chunked prefill disabled"
            )
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv_cache_manager = KVCacheManager(
            num_kv_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            max_model_len,
        )
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self.waiting = WaitingQueue(scheduler_config.scheduling_policy)
        # Finished/aborted since the last non-empty step; kept until a step the runner sees.
        self._finished_req_ids: set[str] = set()
        self._num_preemptions = 0  # cumulative
        self._prefix_queries_total = 0  # tokens looked up, cumulative
        self._prefix_hits_total = 0  # tokens found, cumulative
        self._prompt_tokens_total = 0  # prompt tokens computed, cumulative
        self._generation_tokens_total = 0  # tokens sampled, cumulative
        self._last_num_scheduled_tokens = 0

    # ---- queue management -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not 0 < request.num_tokens <= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} prompt tokens; "
                f"must be between 1 and max_model_len ({self.max_model_len})"
            )
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the given requests as ABORTED and free their blocks right away.

        Returns the requests that existed (unknown or already finished ids are skipped), so
        the caller can tell their clients. Call between steps, not between ``schedule`` and
        ``update_from_output``.
        """
        aborted: list[Request] = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = RequestStatus.FINISHED_ABORTED
            self.kv_cache_manager.free(request)
            self._finished_req_ids.add(rid)
            aborted.append(request)
        return aborted

    def request_ids_of_client(self, client_index: int) -> list[str]:
        """Unfinished requests owned by one front end (to abort them when it goes away)."""
        return [rid for rid, r in self.requests.items() if r.client_index == client_index]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_stats(self) -> SchedulerStats:
        """Current queue sizes and usage, and cumulative counters since the engine started.

        Counters are totals (never reset by reading), so several readers — the coordinator
        feed, metrics, a stats utility call — can all read them without stealing counts.
        """
        queries, hits = self.kv_cache_manager.make_prefix_cache_stats()
        self._prefix_queries_total += queries
        self._prefix_hits_total += hits
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=self._prefix_queries_total,
            prefix_cache_hits=self._prefix_hits_total,
            num_preemptions=self._num_preemptions,
            num_scheduled_tokens=self._last_num_scheduled_tokens,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
        )
        return stats

    # ---- scheduling -------------------------------------------------------------------

    def _pick_victim(self) -> Request:
        """The lowest-priority running request: the latest admitted under FCFS (the running
        list is in arrival order there), the largest ``(priority, arrival_time)`` otherwise."""
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)  # before resetting num_computed_tokens: it reads it
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.push_front(request)

    def schedule(self) -> SchedulerOutput:
        """Build one step. Blocks for every scheduled token are allocated on return."""
        kv = self.kv_cache_manager
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}  # insertion order = batch order
        preempted: list[str] = []

        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_new = min(
                request.num_tokens - request.num_computed_tokens,
                budget,
                self.max_model_len - request.num_computed_tokens,
            )
            if num_new <= 0:  # cannot happen with the finish checks; never loop on it
                idx += 1
                continue
            while kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                victim_idx = self.running.index(victim)
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:  # only under the priority policy: refund its tokens
                    budget += undone.num_new_tokens
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim_idx < idx:
                    idx -= 1
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                # It preempted itself, so everything after it outranks it; go on with those
                # (the list shifted into ``idx``). Under FCFS it was the last one anyway.
                continue
            scheduled[request.request_id] = ScheduledRequest(
                request, num_new, kv.get_block_ids(request.request_id)
            )
            budget -= num_new
            idx += 1

        # Admitting new work while preempting would only thrash; this also keeps the requests
        # preempted in this step from being rescheduled in it.
        if not preempted:
            self._schedule_waiting(budget, scheduled)

        out = SchedulerOutput(
            scheduled=list(scheduled.values()),
            total_num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled.values()),
            preempted_request_ids=preempted,
            finished_request_ids=set(self._finished_req_ids),
        )
        if not out.is_empty:
            self._finished_req_ids.clear()
        self._last_num_scheduled_tokens = out.total_num_scheduled_tokens
        return out

    def schedule_chained(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after ``in_flight``, built before ``in_flight``'s output is known
        (async scheduling), or None when it cannot be predicted.

        Call only while ``in_flight`` runs and before its ``update_from_output``. The new
        step holds exactly ``in_flight``'s requests, in the same order, each computing the
        token ``in_flight`` is sampling for it (``ScheduledRequest.num_ahead == 1``). That is
        predictable only when ``in_flight`` was a pure decode step of every running request
        (nothing waiting to be admitted, nothing preempted) and no request can reach its
        length limit (``max_tokens`` or ``max_model_len``) with ``in_flight``'s token. A
        request that stops on a stop token or is aborted meanwhile costs one wasted row: its
        result is dropped by ``update_from_output``, its blocks freed as usual.
        """
        rows = in_flight.scheduled
        if (not rows or len(self.waiting) or in_flight.preempted_request_ids
                or len(rows) != len(self.running)):
            return None
        for s in rows:
            req = s.request
            if (s.num_new_tokens != 1 or not s.samples or req.is_finished
                    or req.num_tokens + 1 >= self.max_model_len
                    or (req.max_tokens is not None
                        and req.num_output_tokens + 1 >= req.max_tokens)):
                return None
        kv = self.kv_cache_manager
        scheduled: list[ScheduledRequest] = []
        for s in rows:
            req = s.request
            # The in-flight token's slot is held already; hold one more for this step's.
            if kv.allocate_slots(req, 1, num_lookahead_tokens=1) is None:
                return None  # slots taken so far are the next steps' anyway
            scheduled.append(ScheduledRequest(req, 1, kv.get_block_ids(req.request_id),
                                              num_ahead=1))
        self._last_num_scheduled_tokens = len(scheduled)
        return SchedulerOutput(scheduled=scheduled, total_num_scheduled_tokens=len(scheduled),
                               chained=True)

    def _schedule_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> None:
        kv = self.kv_cache_manager
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            hit_blocks, num_hit = kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break  # waits for a step with room for all of it
                num_new = budget
            if kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                break  # keep the order: nobody overtakes the head for lack of blocks
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            if not request.first_scheduled_time:
                request.first_scheduled_time = time.time()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            self.running.append(request)
            scheduled[request.request_id] = ScheduledRequest(
                request, num_new, kv.get_block_ids(request.request_id)
            )
            budget -= num_new

    # ---- results ----------------------------------------------------------------------

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if params.stop_token_ids and token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> dict[int, list[EngineCoreOutput]]:
        """Apply a step's results; returns the outputs to send, keyed by client index.

        Finished requests are freed here and announced in the next step's
        ``finished_request_ids``.
        """
        outputs: dict[int, list[EngineCoreOutput]] = {}
        any_finished = False
        for sched in scheduler_output.scheduled:
            request = sched.request
            if request.is_finished:  # aborted after the step was built
                continue
            samples = sched.samples  # must be read before advancing num_computed_tokens
            start = request.num_computed_tokens
            self._prompt_tokens_total += max(
                0, min(start + sched.num_new_tokens, request.num_prompt_tokens) - start)
            self._generation_tokens_total += int(samples)
            request.num_computed_tokens += sched.num_new_tokens
            rid = request.request_id
            prompt_lps = runner_output.prompt_logprobs.get(rid)
            if samples:
                token = runner_output.sampled_token_ids[rid]
                request.append_output_token(token)
                if not request.first_token_time:
                    request.first_token_time = time.time()
                status = self._check_stop(request, token)
                timing = None
                if status is not None:
                    self._finish(request, status)
                    any_finished = True
                    timing = RequestTiming(request.received_time, request.first_scheduled_time,
                                           request.first_token_time, time.time(),
                                           request.num_preemptions)
                out = EngineCoreOutput(
                    rid,
                    [token],
                    new_logprobs=runner_output.logprobs.get(rid),
                    new_prompt_logprobs=prompt_lps,
                    finish_reason=request.status.finish_reason(),
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    timing=timing,
                )
            elif prompt_lps is not None and prompt_lps.ranks:
                out = EngineCoreOutput(
                    rid,
                    [],
                    new_prompt_logprobs=prompt_lps,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            else:
                continue
            outputs.setdefault(request.client_index, []).append(out)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and free; the caller drops it from ``running``."""
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)
