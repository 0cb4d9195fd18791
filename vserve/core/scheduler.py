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
from collections.abc import Callable, Iterable

from vserve.config import CacheConfig, SchedulerConfig
from vserve.core.kv_cache_manager import KVCacheManager
from vserve.core.request import FINISHED, Request, RequestStatus
from vserve.core.sched_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from vserve.core.waiting_queue import WaitingQueue
from vserve.protocol.outputs import (
    EngineCoreOutputs,
    FinishedRequest,
    FinishReason,
    RequestLogprobs,
    RequestTiming,
    SchedulerStats,
)
from vserve.structured.matcher import consume_tokens

_STOPPED = RequestStatus.FINISHED_STOPPED
_LENGTH = RequestStatus.FINISHED_LENGTH
_FINISH_REASON = {_STOPPED: FinishReason.STOP, _LENGTH: FinishReason.LENGTH}


class _ClientStep:
    """One front end's share of a step's outputs, gathered into the packed lists."""

    __slots__ = ("request_ids", "token_ids", "logprobs", "finished")

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[RequestLogprobs] = []
        self.finished: list[FinishedRequest] = []


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
        engine_index: int = 0,
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
        self._num_constrained = 0  # of ``requests``, those with a grammar
        self.running: list[Request] = []
        self.waiting = WaitingQueue(scheduler_config.scheduling_policy)
        # Finished/aborted since the last non-empty step; kept until a step the runner sees.
        self._finished_req_ids: set[str] = set()
        self._num_preemptions = 0  # cumulative
        self._prefix_queries_total = 0  # tokens looked up, cumulative
        self._prefix_hits_total = 0  # tokens found, cumulative
        self._prompt_tokens_total = 0  # prompt tokens computed, cumulative
        self._generation_tokens_total = 0  # tokens sampled, cumulative
        self.last_num_scheduled_tokens = 0  # of the latest step built
        self.engine_index = engine_index  # stamped on the outputs

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
        if request.grammar is not None:
            self._num_constrained += 1
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
            num_scheduled_tokens=self.last_num_scheduled_tokens,
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
        bs = kv.block_size
        # A decode row whose token lands inside a block it holds, without filling it (which
        # would register the block in the prefix index), needs nothing of the KV manager.
        fast_fill = not kv.enable_prefix_caching

        idx = 0
        running = self.running
        while idx < len(running) and budget > 0:
            request = running[idx]
            c = request.num_computed_tokens
            num_new = len(request.all_token_ids) - c
            if (num_new == 1 and c < len(request.block_ids) * bs
                    and (fast_fill or (c + 1) % bs)):
                scheduled[request.request_id] = ScheduledRequest(request, 1, request.block_ids,
                                                                 0, True)
                budget -= 1
                idx += 1
                continue
            num_new = min(num_new, budget, self.max_model_len - c)
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
                request, num_new, request.block_ids, 0, c + num_new == len(request.all_token_ids))
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
        self.last_num_scheduled_tokens = out.total_num_scheduled_tokens
        return out

    def schedule_chained(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``in_flight``, built while ``in_flight`` runs and before its output
        is known (async scheduling); None when there is nothing to chain or it would need a
        preemption.

        Call only while ``in_flight`` runs and before its ``update_from_output``. Every
        running request gets a row as if ``in_flight`` had been applied: its
        ``in_flight`` tokens count as computed (``ScheduledRequest.num_ahead``), and a row
        of ``in_flight`` that samples adds one token whose id the device still holds — the
        chained row computing that position reads it from the previous step's output.
        Requests still waiting are admitted as prefill rows, under the same token budget
        and sequence cap as :meth:`schedule`.

        What cannot be known ahead costs a wasted row, never a wrong token: a request that
        stops on a stop token or is aborted while its chained row is in flight gets that
        row's result dropped by ``update_from_output``, and its blocks are freed as usual
        (the chained step's writes to them precede, on the device, any later owner's).
        Rows that surely finish with the in-flight token (``max_tokens``, the model's
        window) are left out. Nothing is ever preempted here: when blocks run out, the
        chain stops and the next step is scheduled once ``in_flight`` is applied.
        """
        # Per row, at batch 256 this loop is the engine's largest host cost per step: it is
        # kept to plain attribute reads, and a decode row whose blocks have room skips
        # ``allocate_slots`` (``KVCacheManager.has_room``).
        ahead = {s.request.request_id: s.num_new_tokens for s in in_flight.scheduled}
        kv = self.kv_cache_manager
        budget = self.config.max_num_batched_tokens
        max_len = self.max_model_len
        scheduled: dict[str, ScheduledRequest] = {}
        for request in self.running:
            if budget <= 0:
                break
            if request.status >= FINISHED:
                continue
            rid = request.request_id
            num_ahead = ahead.get(rid, 0)
            c = request.num_computed_tokens + num_ahead
            known = len(request.all_token_ids)
            # The in-flight row samples when it reaches the sequence's last known token.
            samples_ahead = num_ahead > 0 and c == known
            num_tokens = known + samples_ahead
            if samples_ahead:
                max_tokens = request.max_tokens
                if ((max_tokens is not None and len(request.output_token_ids) + 1 >= max_tokens)
                        or num_tokens >= max_len):
                    continue  # it finishes with the in-flight token
            num_new = min(num_tokens - c, budget, max_len - c)
            if num_new <= 0:
                continue
            # The last row token is the in-flight sample when the row reaches it: its slot
            # is held as lookahead (only blocks full of known tokens get registered).
            lookahead = 1 if samples_ahead and c + num_new == num_tokens else 0
            if not kv.has_room(request, c + num_new - lookahead, lookahead) and \
                    kv.allocate_slots(request, num_ahead + num_new - lookahead,
                                      num_lookahead_tokens=lookahead) is None:
                return None  # slots taken so far are the next steps' anyway
            scheduled[rid] = ScheduledRequest(
                request, num_new, request.block_ids, num_ahead, c + num_new == num_tokens)
            budget -= num_new
        self._schedule_waiting(budget, scheduled)
        if not scheduled:
            return None
        self.last_num_scheduled_tokens = sum(x.num_new_tokens for x in scheduled.values())
        out = SchedulerOutput(scheduled=list(scheduled.values()),
                              total_num_scheduled_tokens=self.last_num_scheduled_tokens,
                              finished_request_ids=set(self._finished_req_ids), chained=True)
        self._finished_req_ids.clear()
        return out

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
                request, num_new, request.block_ids, 0, num_hit + num_new == request.num_tokens)
            budget -= num_new

    # ---- results ----------------------------------------------------------------------

    def _check_stop(self, request: Request, token: int, num_output: int) -> RequestStatus | None:
        """The status ``request`` finishes with after sampling ``token`` (its
        ``num_output``-th output token), or None."""
        if num_output >= request.min_tokens:
            if token in request.stop_token_ids:
                request.stop_reason = token
                return _STOPPED
            if token in request.eos_ids_active:
                request.stop_reason = None
                return _STOPPED
        max_tokens = request.max_tokens
        if max_tokens is not None and num_output >= max_tokens:
            return _LENGTH
        if len(request.all_token_ids) >= self.max_model_len:
            return _LENGTH
        return None

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput,
                           grammars_advanced: Callable[[], None] | None = None
                           ) -> dict[int, EngineCoreOutputs]:
        """Apply a step's results; returns the step's packed outputs, one per front end
        (client index) that has any.

        ``grammars_advanced``: called once the step's tokens are in the grammars, before the
        rest of the step is applied, so that the next step's bitmasks can be filled
        meanwhile. Tokens are not yet appended to the requests' outputs then.

        Finished requests are freed here and announced in the next step's
        ``finished_request_ids``. Hot path: per row, only list appends and integer checks;
        objects are made only for requests that finish or asked for logprobs.
        """
        clients: dict[int, _ClientStep] = {}
        finished: list[Request] = []
        sampled = runner_output.sampled_token_ids
        token_logprobs = runner_output.logprobs
        prompt_logprobs = runner_output.prompt_logprobs
        prompt_total = generated = 0
        now = 0.0
        # The grammars see the step's tokens first, so that the next step's masks can start
        # filling (``grammars_advanced``) while the loop below applies the rest.
        completed = (self._consume_grammar_tokens(scheduler_output, sampled)
                     if self._num_constrained else None)
        if grammars_advanced is not None:
            grammars_advanced()
        for sched in scheduler_output.scheduled:
            request = sched.request
            if request.status >= FINISHED:  # aborted after the step was built
                continue
            start = request.num_computed_tokens
            n = sched.num_new_tokens
            num_tokens = len(request.all_token_ids)
            samples = start + n == num_tokens  # read before advancing num_computed_tokens
            if start < request.num_prompt_tokens:
                prompt_total += min(start + n, request.num_prompt_tokens) - start
            request.num_computed_tokens = start + n
            rid = request.request_id
            if samples:
                generated += 1
                token = sampled[rid]
                request.output_token_ids.append(token)
                request.all_token_ids.append(token)
                if not request.first_token_time:
                    now = now or time.time()
                    request.first_token_time = now
                client = clients.get(request.client_index)
                if client is None:
                    client = clients[request.client_index] = _ClientStep()
                client.request_ids.append(rid)
                client.token_ids.append(token)
                status = self._check_stop(request, token, len(request.output_token_ids))
                if completed is not None and rid in completed and status is None:
                    # The grammar is complete: nothing but EOS could follow.
                    request.stop_reason = None
                    status = _STOPPED
                if status is not None:
                    now = now or time.time()
                    self._finish(request, status)
                    finished.append(request)
                    client.finished.append(FinishedRequest(
                        rid, _FINISH_REASON[status], request.stop_reason,
                        max(request.num_cached_tokens, 0),
                        timing=RequestTiming(request.received_time,
                                             request.first_scheduled_time,
                                             request.first_token_time, now,
                                             request.num_preemptions)))
            if prompt_logprobs or token_logprobs:
                plp = prompt_logprobs.get(rid)
                tlp = token_logprobs.get(rid) if samples else None
                if tlp is not None or (plp is not None and plp.ranks):
                    client = clients.get(request.client_index)
                    if client is None:
                        client = clients[request.client_index] = _ClientStep()
                    client.logprobs.append(RequestLogprobs(rid, tlp, plp))
        self._prompt_tokens_total += prompt_total
        self._generation_tokens_total += generated
        if finished:
            self.running = [r for r in self.running if r.status < FINISHED]
        return {index: EngineCoreOutputs(self.engine_index, c.request_ids, c.token_ids,
                                         c.logprobs, c.finished)
                for index, c in clients.items()}

    @staticmethod
    def _consume_grammar_tokens(scheduler_output: SchedulerOutput,
                                sampled: dict[str, int]) -> set[str]:
        """Advance the grammar of every constrained row that sampled this step by its token
        (as ``update_from_output`` will append it); returns the ids of the requests whose
        grammar is now complete (nothing but EOS could follow: the request stops there)."""
        rows = []
        for sched in scheduler_output.scheduled:
            request = sched.request
            if (request.grammar is not None and request.status < FINISHED
                    and request.num_computed_tokens + sched.num_new_tokens
                    == len(request.all_token_ids)):
                rows.append(request)
        if not rows:
            return set()
        consume_tokens([(r.grammar, sampled[r.request_id]) for r in rows])
        return {r.request_id for r in rows if r.grammar.is_stopped()}

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and free; the caller drops it from ``running``."""
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        if request.grammar is not None:
            self._num_constrained -= 1
        self._finished_req_ids.add(request.request_id)
