"""The engine side of one HTTP generation request, shared by completions and chat.

A request with P prompts and ``n`` choices becomes P·n engine requests ("children"); choice
``p * n + j`` is prompt p's j-th sample (seed + j when seeded). ``Generation`` owns them:

* ``start`` checks admission (draining → 503; over ``--max-num-queued-reqs`` → 503 with
  Retry-After) and registers every child with the engine client;
* ``deltas`` yields ``CompletionDelta`` s of all children as they arrive (``delta.index`` is
  the choice index); all children feed one queue, so one ``await`` wakes on whichever
  produced;
* ``close`` aborts every child the engine has not finished. Invariant: every code path that
  called ``start`` calls ``close`` (``finally``), so no request outlives its HTTP request —
  errors, client disconnects and stop strings included.

Engine request ids are ``<response id>-<choice index>``; a response id built from a
client's ``X-Request-Id`` gets a random suffix on top, because two clients may send the same
id at once (to two API servers) and the engine needs unique ids.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from vserve.api.errors import APIError
from vserve.api.middleware import CLIENT_REQUEST_ID_KEY, REQUEST_ID_KEY
from vserve.api.protocol import FieldError, _Generation, structured_output_of
from vserve.api.state import ServerState
from vserve.frontend.engine_client import EngineDeadError, EngineUnavailableError
from vserve.frontend.input_processor import PromptTooLongError, check_prompt, child_params
from vserve.frontend.output_processor import CompletionDelta, RequestState
from vserve.metrics.request_metrics import (
    REQUESTS_IN_FLIGHT,
    REQUESTS_REJECTED,
    SequenceTimer,
    record_request,
)
from vserve.protocol.outputs import EngineCoreOutput, RequestTiming
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams, StructuredOutput
from vserve.structured.grammar import check

RETRY_AFTER_S = 1


class GenerationError(Exception):
    """A failure after the request was admitted: an HTTP error before the first byte was
    sent, an SSE error event after it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Prompt:
    text: str | None  # the prompt as the client wrote it, when it was text
    token_ids: list[int]
    params: SamplingParams  # max_tokens resolved against this prompt's length


@dataclass
class Child:
    index: int  # the choice index
    prompt_index: int
    engine_id: str
    state: RequestState
    timer: SequenceTimer
    timing: RequestTiming | None = None  # the engine's timestamps, on its finishing output


def resolve_model(state: ServerState, name: str | None) -> str:
    """The model name to report; 404 for a name this server does not serve."""
    if name is None:
        return state.model_name
    if name not in state.model_names:
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in state.model_names)}", param="model")
    return name


def response_id(request: Request, prefix: str) -> tuple[str, bool]:
    """(``<prefix><request id>``, whether the client chose the id)."""
    scope = request.scope
    return prefix + scope[REQUEST_ID_KEY], bool(scope.get(CLIENT_REQUEST_ID_KEY))


def prepare_prompt(state: ServerState, text: str | None, token_ids: list[int],
                   params: SamplingParams, prompt_param: str, max_tokens_param: str) -> Prompt:
    """Check one prompt against the window and the vocabulary and resolve max_tokens.

    ``params.max_tokens`` None means "whatever the window leaves" (the engine stops at the
    window). Raises APIError(400) naming the field.
    """
    window = state.max_model_len
    default_max = state.sampling_defaults.get("max_tokens")
    if params.max_tokens is None and default_max is not None:
        # The model's max_new_tokens, within the room the prompt leaves (as vLLM does).
        params = params.clone(max_tokens=max(1, min(default_max, window - len(token_ids))))
    try:
        check_prompt(token_ids, params, window, state.vocab_size)
    except PromptTooLongError as e:
        raise APIError(400, str(e), prompt_param) from None
    except ValueError as e:
        raise APIError(400, str(e), prompt_param) from None
    n = len(token_ids)
    if params.max_tokens is not None and n + params.max_tokens > window:
        raise APIError(400, f"this model's maximum context length is {window} tokens, but "
                       f"the prompt is {n} tokens long and {max_tokens_param} is "
                       f"{params.max_tokens} ({n + params.max_tokens} in total); lower "
                       f"{max_tokens_param} to at most {window - n}", max_tokens_param)
    if n + params.min_tokens > window:
        raise APIError(400, f"min_tokens is {params.min_tokens}, but the prompt is {n} tokens "
                       f"long and this model's maximum context length is {window} tokens",
                       "min_tokens")
    return Prompt(text, token_ids, params)


def structured_constraint(body: _Generation) -> StructuredOutput | None:
    """The output constraint of ``response_format`` / ``structured_outputs``, checked: a
    schema, regex or grammar that cannot be enforced is a 400 naming the field, before
    anything reaches an engine."""
    try:
        so, param = structured_output_of(body.response_format, body.structured_outputs)
    except FieldError as e:
        raise APIError(400, str(e), e.param) from None
    if so is not None:
        error = check(so)
        if error is not None:
            raise APIError(400, f"{param}: {error}", param)
    return so


def check_vocab_ids(state: ServerState, params: SamplingParams) -> None:
    """Token ids given as parameters must index the model's vocabulary."""
    vocab = state.vocab_size
    for tok in params.logit_bias or ():
        if not 0 <= tok < vocab:
            raise APIError(400, f"logit_bias has token id {tok}, outside the vocabulary "
                           f"(0..{vocab - 1})", "logit_bias")
    for tok in params.stop_token_ids or ():
        if not 0 <= tok < vocab:
            raise APIError(400, f"stop_token_ids has token id {tok}, outside the vocabulary "
                           f"(0..{vocab - 1})", "stop_token_ids")


def check_priority(state: ServerState, priority: int | None) -> int:
    if priority and state.engine_config.scheduler.scheduling_policy != "priority":
        raise APIError(400, "priority needs the server to run with --scheduling-policy "
                       "priority", "priority")
    return priority or 0


def check_accepting(state: ServerState, count_rejection: bool = False) -> None:
    """503 while the server is draining, not ready yet, or has no engine serving."""
    if not state.accepting:
        why = ("draining" if state.draining else "not_ready" if not state.ready
               else "restarting" if state.healthy else "unhealthy")
        if count_rejection:
            REQUESTS_REJECTED.labels(state.model_name, why).inc()
        raise APIError(503, f"the server is not accepting requests ({why.replace('_', ' ')})")


def check_admission(state: ServerState, num_children: int) -> bool:
    """``check_accepting``, and 503 with Retry-After when the whole server's queue is full;
    True if the request was counted in the admission ledger (release it when it ends).

    Two checks, both local (a refused request never costs an engine round trip):

    - exact: the sequences every API server has in flight (``state.admission``, a shared
      ledger updated under a lock) may not exceed the running capacity — ``max_num_seqs``
      per serving engine — plus the bound; a request alone on an idle server is admitted
      whatever its size;
    - by load: the engines' waiting requests (the coordinator's latest snapshot plus this
      server's routing since) plus the request's may not exceed the bound. This catches a
      queue that forms below ``max_num_seqs`` because the KV cache is full.
    """
    check_accepting(state, count_rejection=True)
    bound = state.server_config.max_num_queued_reqs
    if bound is None:
        return False
    queued = sum(waiting for waiting, _ in state.engine_client.load.loads())
    if queued > 0 and queued + num_children > bound:
        _refuse_overloaded(state, f"{queued} requests are waiting (limit {bound})")
    if state.admission is None:
        return False
    capacity = (state.engine_config.scheduler.max_num_seqs
                * max(1, state.engine_client.num_serving))
    refused_at = state.admission.try_admit(state.client_index, num_children, capacity + bound)
    if refused_at is not None:
        _refuse_overloaded(state, f"{refused_at} sequences are in flight (limit "
                                  f"{capacity} running + {bound} waiting)")
    return True


def _refuse_overloaded(state: ServerState, why: str) -> None:
    REQUESTS_REJECTED.labels(state.model_name, "overloaded").inc()
    raise APIError(503, f"the server is overloaded: {why}; retry later",
                   headers={"Retry-After": str(RETRY_AFTER_S)})


class Generation:
    def __init__(self, state: ServerState, rid: str, client_chose_id: bool,
                 prompts: list[Prompt], priority: int = 0) -> None:
        self.server = state
        self.response_id = rid
        self.prompts = prompts
        self.priority = priority
        self.created = int(time.time())
        suffix = f"-{secrets.token_hex(4)}" if client_chose_id else ""
        self.children: list[Child] = []
        for p, prompt in enumerate(prompts):
            n = prompt.params.n
            for j in range(n):
                index = p * n + j
                engine_id = f"{rid}-{index}{suffix}"
                try:
                    params = child_params(prompt.params, j)
                except ValueError:  # seed + j overflows: the seed is the client's
                    raise APIError(400, f"seed + {n - 1} (for n={n} choices) must fit in a "
                                   "signed 64-bit integer", "seed") from None
                rs = RequestState(engine_id, index, prompt.token_ids, params, state.tokenizer)
                self.children.append(Child(index, p, engine_id, rs, SequenceTimer()))
        self._by_id = {c.engine_id: c for c in self.children}
        self._queue: asyncio.Queue[EngineCoreOutput | BaseException] = asyncio.Queue()
        self._unfinished = len(self.children)
        self._ledgered = 0  # children counted in the admission ledger and not released
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Admit and register every child (APIError 503 if that is not possible)."""
        if check_admission(self.server, len(self.children)):
            self._ledgered = len(self.children)
        client = self.server.engine_client
        now = time.time()
        try:
            for child in self.children:
                prompt = self.prompts[child.prompt_index]
                req = EngineCoreRequest(child.engine_id, prompt.token_ids, child.state.params,
                                        self.server.eos_token_ids, now,
                                        self.server.client_index, self.priority)
                # Every child feeds this request's one queue.
                client.add_request(req, self._queue)
        except (EngineDeadError, EngineUnavailableError) as e:
            self.close()
            raise APIError(503, f"no engine can take the request: {e}") from None
        except BaseException:
            self.close()
            raise
        self._started = True
        REQUESTS_IN_FLIGHT.labels(self.server.model_name).inc(len(self.children))

    async def deltas(self) -> AsyncIterator[CompletionDelta]:
        """Every child's deltas until all finished; GenerationError on an engine failure."""
        queue, by_id = self._queue, self._by_id
        while self._unfinished:
            item = await queue.get()
            if isinstance(item, BaseException):  # its engine died, or the server shut down
                raise GenerationError(503, f"the request could not finish: {item}")
            child = by_id.get(item.request_id)
            if child is None or child.state.finished:
                continue  # e.g. the abort echo of a child stopped on a stop string
            if item.timing is not None:
                child.timing = item.timing
            delta = child.state.apply(item)
            if delta is None:
                continue
            child.timer.on_tokens(len(delta.token_ids))
            if delta.finish_reason is not None:
                self._unfinished -= 1
                self._release(1)
                if delta.needs_abort:  # finished here on a stop string: free it in the engine
                    self.server.engine_client.abort([child.engine_id])
                if delta.finish_reason == "error":
                    raise GenerationError(500, f"the engine failed the request: {delta.error}")
                if delta.finish_reason == "abort":
                    raise GenerationError(503, "the request was aborted by the server")
            yield delta

    async def run(self) -> None:
        """Drive the generation to its end (for non-streaming responses)."""
        async for _ in self.deltas():
            pass

    def close(self) -> None:
        """Abort every child still running (idempotent; finished ones are skipped), and
        record the request's metrics once."""
        if self._closed:
            return
        self._closed = True
        live = [c.engine_id for c in self.children if not c.state.finished]
        if live:
            self.server.engine_client.abort(live)
        self._release(self._ledgered)
        if self._started:
            self._record()

    def _release(self, count: int) -> None:
        count = min(count, self._ledgered)
        if count and self.server.admission is not None:
            self._ledgered -= count
            self.server.admission.release(self.server.client_index, count)

    def _record(self) -> None:
        model = self.server.model_name
        REQUESTS_IN_FLIGHT.labels(model).dec(len(self.children))
        usage = self.usage()
        params = self.prompts[0].params
        record_request(
            model, prompt_tokens=usage["prompt_tokens"],
            generation_tokens=usage["completion_tokens"],
            finish_reasons=[c.state.finish_reason or "abort" for c in self.children],
            timers=[c.timer for c in self.children],
            timings=[c.timing for c in self.children], n=params.n,
            max_tokens=params.max_tokens)

    def usage(self) -> dict[str, int]:
        """Each prompt counted once (not once per choice); completion tokens summed over all
        choices."""
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(len(c.state.token_ids) for c in self.children)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}
