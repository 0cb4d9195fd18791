"""``LLM``: the engine as a library, for plain scripts.

The engine core runs in a child process started as ``python -m vserve.engine.core_proc``
(a fresh interpreter through vserve's own entry point). That is why a script needs no
``if __name__ == "__main__":`` guard — the child never imports the user's ``__main__`` —
and why creating an LLM after the caller initialized CUDA is fine: nothing is forked.
"""

from __future__ import annotations

import atexit
import itertools
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import zmq

from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from vserve.engine.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestType,
    SchedulerStats,
    UtilityRequest,
    engine_identity,
)
from vserve.frontend.input_processor import (
    PromptInput,
    check_prompt,
    child_params,
    load_eos_token_ids,
    tokenize_prompt,
)
from vserve.frontend.output_processor import RequestState
from vserve.launch.engines import EngineLauncher
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir
from vserve.logging_utils import get_logger, init_logging
from vserve.models.loader import resolve_model_dir
from vserve.outputs import CompletionOutput, RequestOutput
from vserve.sampling_params import SamplingParams
from vserve.tokenizer import Tokenizer

logger = get_logger(__name__)
_encoder = msgspec.msgpack.Encoder()
_out_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)


class LLM:
    """Generate from a model in this script. Arguments mirror ``vserve serve``'s options."""

    def __init__(
        self,
        model: str = "demo",
        *,
        tokenizer: str | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        chat_template: str | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        kv_cache_memory_bytes: int = 1 << 30,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_chunked_prefill: bool = True,
        scheduling_policy: str = "fcfs",
        async_scheduling: bool | None = None,
        device: str = "auto",
        enforce_eager: bool = False,
        startup_timeout: float = 600.0,
    ) -> None:
        init_logging("LLM")
        self.config = EngineConfig(
            model=ModelConfig(model=model, tokenizer=tokenizer, revision=revision, dtype=dtype,
                              max_model_len=max_model_len, seed=seed,
                              chat_template=chat_template),
            cache=CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                              kv_cache_memory_bytes=kv_cache_memory_bytes,
                              num_kv_blocks=num_kv_blocks,
                              gpu_memory_utilization=gpu_memory_utilization),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      policy=scheduling_policy,
                                      async_scheduling=async_scheduling),
            device=DeviceConfig(device=device, enforce_eager=enforce_eager),
        )
        self.model_dir = resolve_model_dir(model, revision)
        tok_dir = resolve_model_dir(tokenizer, revision) if tokenizer else self.model_dir
        self.tokenizer = Tokenizer.from_pretrained(tok_dir, chat_template=chat_template)
        self.eos_token_ids = load_eos_token_ids(self.model_dir, self.tokenizer)
        self._counter = itertools.count()
        self._closed = False

        self.run_dir = make_run_dir()
        self.ctx = zmq.Context()
        self._input = self.ctx.socket(zmq.ROUTER)
        self._input.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(ipc_endpoint(self.run_dir, "input-0"))
        self._output = self.ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(ipc_endpoint(self.run_dir, "output-0"))
        self.launcher = EngineLauncher(
            ctx=self.ctx, config=self.config, model_dir=self.model_dir,
            handshake_addr=ipc_endpoint(self.run_dir, "handshake"),
            input_addrs=[_endpoint(self._input)],
            output_addrs=[_endpoint(self._output)],
            engine_ranks=[0], num_engines=1,
        )
        self._finalizer = weakref.finalize(self, _cleanup, self.launcher, self.ctx,
                                           self.run_dir)
        atexit.register(self._finalizer)
        try:
            self.launcher.start_processes()
            ready = self.launcher.wait_ready(startup_timeout)[0]
            self._wait_engine_hello(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = ready.max_model_len
        self.num_kv_blocks = ready.num_kv_blocks
        self.vocab_size = self._vocab_size()

    def _vocab_size(self) -> int:
        import json

        return int(json.loads((self.model_dir / "config.json").read_text())["vocab_size"])

    def _wait_engine_hello(self, timeout: float) -> None:
        if not self._input.poll(int(timeout * 1000)):
            raise RuntimeError("the engine never connected to its input socket")
        identity, kind, _ = self._input.recv_multipart()
        if identity != engine_identity(0) or kind != RequestType.HELLO.value:
            raise RuntimeError("unexpected first message from the engine")

    # ---- public API --------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

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
            sampling_params = SamplingParams()
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
        states: dict[str, tuple[int, RequestState]] = {}
        now = time.time()
        for i, ((text, ids), p) in enumerate(zip(encoded, params)):
            rid = f"{next(self._counter)}-{uuid.uuid4().hex[:8]}"
            results.append(RequestOutput(rid, text, ids, []))
            for j in range(p.n):
                cp = child_params(p, j)
                child_id = f"{rid}-{j}" if p.n > 1 else rid
                states[child_id] = (i, RequestState(child_id, j, ids, cp, self.tokenizer))
                req = EngineCoreRequest(child_id, ids, cp, self.eos_token_ids, now)
                self._send(RequestType.ADD, req)

        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(states), desc="Processed prompts", dynamic_ncols=True)
        pending = set(states)
        try:
            while pending:
                for out in self._recv().outputs:
                    entry = states.get(out.request_id)
                    if entry is None or out.request_id not in pending:
                        continue
                    _, state = entry
                    delta = state.apply(out)
                    if delta is not None and delta.needs_abort:
                        self._send(RequestType.ABORT, [out.request_id])
                    if state.finished:
                        if state.finish_reason == "error":
                            raise RuntimeError(f"the engine failed request {out.request_id}: "
                                               f"{out.error}")
                        pending.discard(out.request_id)
                        if pbar is not None:
                            pbar.update(1)
        except BaseException:
            if pending:
                self._send(RequestType.ABORT, sorted(pending))
            raise
        finally:
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
        call_id = next(self._counter)
        self._send(RequestType.UTILITY, UtilityRequest(call_id, "stats", [0]))
        while True:
            outs = self._recv()
            res = outs.utility_output
            if res is not None and res.call_id == call_id:
                if res.failure:
                    raise RuntimeError(res.failure)
                return msgspec.msgpack.decode(res.result, type=SchedulerStats)

    def _send(self, kind: RequestType, payload: Any) -> None:
        self._input.send_multipart([engine_identity(0), kind.value, _encoder.encode(payload)])

    def _recv(self) -> EngineCoreOutputs:
        while not self._output.poll(1000):
            dead = self.launcher.dead_engines()
            if dead:
                raise RuntimeError(f"the engine process exited (code {dead[0][1]}); see its "
                                   "log above")
        outs = _out_decoder.decode(self._output.recv())
        if outs.engine_dead:
            raise RuntimeError(f"the engine died: {outs.engine_dead}")
        return outs

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _endpoint(sock: zmq.Socket) -> str:
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _cleanup(launcher: EngineLauncher, ctx: zmq.Context, run_dir: Path) -> None:
    try:
        launcher.shutdown()
    finally:
        ctx.destroy(linger=0)
        remove_run_dir(run_dir)
