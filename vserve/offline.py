"""``LLM``: the engine as a library, for plain scripts.

The engine core runs in a child process started as ``python -m vserve.engine.core_proc``
(a fresh interpreter through vserve's own entry point). That is why a script needs no
``if __name__ == "__main__":`` guard — the child never imports the user's ``__main__`` —
and why creating an LLM after the caller initialized CUDA is fine: nothing is forked.
"""

from __future__ import annotations

import atexit
import itertools
import json
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from vserve.config import EngineConfig
from vserve.frontend.engine_client import EngineDeadError
from vserve.frontend.generation_defaults import load_sampling_defaults
from vserve.frontend.input_processor import (
    PromptInput,
    check_prompt,
    child_params,
    load_eos_token_ids,
    tokenize_prompt,
)
from vserve.frontend.output_processor import RequestState
from vserve.frontend.sync_client import SyncEngineClient
from vserve.frontend.tokenizer import Tokenizer
from vserve.launch.engines import EngineLauncher
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir
from vserve.logging_utils import get_logger, init_logging
from vserve.models.source import resolve_model_dir
from vserve.outputs import CompletionOutput, RequestOutput
from vserve.protocol.outputs import SchedulerStats
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams

logger = get_logger(__name__)

# Where each request's outputs go: (index of its prompt, its detokenizing state).
_Sink = tuple[int, RequestState]


class LLM:
    """Generate from a model in this script.

    ``LLM(model, **options)`` takes the engine options of ``vserve serve`` by their field
    names in ``vserve.config`` (``dtype=``, ``max_model_len=``, ``block_size=``,
    ``max_num_seqs=``, ``device=``, …); an unknown name is a TypeError that lists them all.
    ``startup_timeout`` bounds how long loading the model may take.
    """

    def __init__(self, model: str = "demo", *, startup_timeout: float = 600.0,
                 **options: Any) -> None:
        init_logging("LLM")
        self.config = EngineConfig.from_options(model=model, **options)
        m = self.config.model
        self.model_dir = resolve_model_dir(m.model, m.revision)
        tok_dir = resolve_model_dir(m.tokenizer, m.revision) if m.tokenizer else self.model_dir
        self.tokenizer = Tokenizer.from_pretrained(tok_dir, chat_template=m.chat_template)
        self.eos_token_ids = load_eos_token_ids(self.model_dir, self.tokenizer)
        self.sampling_defaults = load_sampling_defaults(self.model_dir, m.generation_config)
        self.vocab_size = int(json.loads((self.model_dir / "config.json").read_text())[
            "vocab_size"])
        self._counter = itertools.count()
        self._closed = False

        self.run_dir = make_run_dir()
        self.ctx: zmq.Context = zmq.Context()
        self.client: SyncEngineClient[_Sink] = SyncEngineClient(
            self.ctx, 1, ipc_endpoint(self.run_dir, "input-0"),
            ipc_endpoint(self.run_dir, "output-0"), self._check_engine_alive)
        core = self.client.core
        self.launcher = EngineLauncher(
            ctx=self.ctx, config=self.config, model_dir=self.model_dir,
            handshake_addr=ipc_endpoint(self.run_dir, "handshake"),
            input_addrs=[core.input_addr], output_addrs=[core.output_addr],
            engine_ranks=[0], num_engines=1,
        )
        self._finalizer = weakref.finalize(self, _cleanup, self.launcher, self.client,
                                           self.ctx, self.run_dir)
        atexit.register(self._finalizer)
        try:
            self.launcher.start_processes()
            ready = self.launcher.wait_ready(startup_timeout)[0]
            self.client.wait_for_engines(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = ready.max_model_len
        self.num_kv_blocks = ready.num_kv_blocks

    def _check_engine_alive(self) -> None:
        dead = self.launcher.dead_engines()
        if dead:
            raise RuntimeError(f"the engine process exited (code {dead[0][1]}); see its log "
                               "above")

    # ---- public API --------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without sampling params: the model's generation config
        (``generation_config`` option) over SamplingParams' own defaults."""
        return SamplingParams(**self.sampling_defaults)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt; results come back in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompt_list: list[PromptInput] = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(prompt_list)} prompts but {len(params_list)} "
                                 "sampling_params")
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts: list[PromptInput] = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt,  # type: ignore[arg-type]
                chat_template=chat_template)
            # The template already holds the special tokens (BOS) it wants.
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text,
                                                                      add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- the loop ----------------------------------------------------------------------
    def _run(self, prompts: list[PromptInput], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        if self._closed:
            raise RuntimeError("this LLM was shut down")
        encoded = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            text, ids = tokenize_prompt(prompt, self.tokenizer)
            try:
                check_prompt(ids, p, self.max_model_len, self.vocab_size)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            encoded.append((text, ids))

        results: list[RequestOutput] = []
        states: dict[str, _Sink] = {}
        now = time.time()
        pending: set[str] = set()
        pbar = None
        try:
            for i, ((text, ids), p) in enumerate(zip(encoded, params)):
                rid = f"{next(self._counter)}-{uuid.uuid4().hex[:8]}"
                results.append(RequestOutput(rid, text, ids, []))
                for j in range(p.n):
                    cp = child_params(p, j)
                    child_id = f"{rid}-{j}" if p.n > 1 else rid
                    sink = (i, RequestState(child_id, j, ids, cp, self.tokenizer))
                    states[child_id] = sink
                    self.client.add_request(
                        EngineCoreRequest(child_id, ids, cp, self.eos_token_ids, now), sink)
                    pending.add(child_id)
            if use_tqdm:
                from tqdm.auto import tqdm

                pbar = tqdm(total=len(states), desc="Processed prompts", dynamic_ncols=True)
            while pending:
                for (_, state), out in self.client.get_outputs():
                    delta = state.apply(out)
                    if delta is not None and delta.needs_abort:
                        self.client.abort([out.request_id])
                    if state.finished:
                        if state.finish_reason == "error":
                            raise RuntimeError(f"the engine failed request {out.request_id}: "
                                               f"{out.error}")
                        pending.discard(out.request_id)
                        if pbar is not None:
                            pbar.update(1)
        except EngineDeadError as e:
            raise RuntimeError(str(e)) from None
        finally:
            if pending:
                self.client.abort(sorted(pending))
            if pbar is not None:
                pbar.close()

        for i, st in states.values():
            res = results[i]
            res.outputs.append(CompletionOutput(
                index=st.index, text=st.text, token_ids=st.token_ids,
                cumulative_logprob=st.cumulative_logprob, logprobs=st.logprobs,
                finish_reason=st.finish_reason, stop_reason=st.stop_reason))
            res.prompt_logprobs = st.prompt_logprobs
            res.num_cached_tokens = st.num_cached_tokens
            res.finished = True
        for res in results:
            res.outputs.sort(key=lambda o: o.index)
        return results

    def engine_stats(self) -> SchedulerStats:
        """The engine's scheduler stats (running, waiting, KV use, cumulative counters)."""
        return self.client.get_stats(0)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _cleanup(launcher: EngineLauncher, client: SyncEngineClient[Any], ctx: zmq.Context,
             run_dir: Path) -> None:
    try:
        launcher.shutdown()
    finally:
        client.close()
        ctx.destroy(linger=0)
        remove_run_dir(run_dir)
