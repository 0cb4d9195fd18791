"""``POST /v1/completions``: the legacy completions API.

Prompts: a string, a list of strings, token ids, or a list of token-id lists; each prompt
gets ``n`` choices, choice ``p * n + j`` for prompt p. ``echo`` prepends the prompt (its
text as sent, or the decoded token ids) to the first chunk of each choice, with its
logprobs when ``logprobs`` is set (the engine computes prompt logprobs for that).
``text_offset`` counts characters of the choice's ``text``: the echoed prompt's tokens from
0, the generated ones from where the generated text starts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from vserve.api.errors import APIError, bad_value
from vserve.api.generation import (
    Child,
    Generation,
    Prompt,
    check_priority,
    check_vocab_ids,
    prepare_prompt,
    resolve_model,
    response_id,
    structured_constraint,
)
from vserve.api.logprobs import completion_logprobs, filter_rows, prompt_logprobs_json
from vserve.api.protocol import MAX_N, CompletionRequest
from vserve.api.responses import ERROR_RESPONSES, CompletionResponse
from vserve.api.serving import respond
from vserve.api.state import ServerState
from vserve.frontend.detokenizer import token_display
from vserve.frontend.input_processor import PromptTooLongError, encode_bounded
from vserve.frontend.output_processor import CompletionDelta
from vserve.frontend.tokenizer import Tokenizer
from vserve.outputs import PositionLogprobs


def _merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}


class CompletionFormatter:
    def __init__(self, gen: Generation, model: str, tokenizer: Tokenizer, echo: bool,
                 logprobs: int | None, prompt_logprobs: int | None) -> None:
        self.gen = gen
        self.tokenizer = tokenizer
        self.echo = echo
        self.k = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.head = {"id": gen.response_id, "object": "text_completion",
                     "created": gen.created, "model": model}
        self._emitted = [-1] * len(gen.children)  # text length streamed per choice; -1: none

    def _echo(self, child: Child) -> tuple[str, dict[str, Any] | None]:
        """The prompt as echoed: its text, and its logprobs when asked for."""
        prompt: Prompt = self.gen.prompts[child.prompt_index]
        text = prompt.text
        if text is None:
            text = self.tokenizer.decode(prompt.token_ids,
                                         skip_special_tokens=prompt.params.skip_special_tokens)
        if self.k is None:
            return text, None
        rows = child.state.prompt_logprobs or []
        first = token_display(self.tokenizer, prompt.token_ids[0])
        return text, completion_logprobs(prompt.token_ids, rows, self.k, 0, first)

    def _generated(self, token_ids: list[int], rows: list[PositionLogprobs] | None,
                   offset: int) -> dict[str, Any] | None:
        if self.k is None:
            return None
        return completion_logprobs(token_ids, list(rows or []), self.k, offset)

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: CompletionDelta, token_ids: list[int], text: str,
              logprobs: list[PositionLogprobs] | None) -> dict[str, Any]:
        i = delta.index
        echo_lp = None
        if self._emitted[i] < 0:
            self._emitted[i] = 0
            if self.echo:
                echo_text, echo_lp = self._echo(self.gen.children[i])
                self._emitted[i] = len(echo_text)
                text = echo_text + text
                echo_text_len = len(echo_text)
            else:
                echo_text_len = 0
            offset = echo_text_len
        else:
            offset = self._emitted[i]
        lp = _merge(echo_lp, self._generated(token_ids, logprobs, offset))
        self._emitted[i] = offset + len(delta.text)
        choice = {"index": i, "text": text, "logprobs": lp,
                  "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
        return {**self.head, "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    def response(self) -> dict[str, Any]:
        choices = []
        for child in self.gen.children:
            st = child.state
            text, echo_lp = self._echo(child) if self.echo else ("", None)
            choice: dict[str, Any] = {
                "index": child.index, "text": text + st.text,
                "logprobs": _merge(echo_lp, self._generated(st.token_ids, st.logprobs,
                                                            len(text))),
                "finish_reason": st.finish_reason, "stop_reason": st.stop_reason}
            if self.prompt_logprobs is not None:
                rows = filter_rows(st.prompt_logprobs or [], self.prompt_logprobs)
                choice["prompt_logprobs"] = prompt_logprobs_json(rows)
            choices.append(choice)
        return {**self.head, "choices": choices, "usage": self.gen.usage()}


def _num_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts ``prompt`` holds (a token-id list is one)."""
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return 1
    return len(prompt)


def _prompts(body: CompletionRequest, tokenizer: Tokenizer, max_model_len: int
             ) -> list[tuple[str | None, list[int]]]:
    add_special = body.add_special_tokens is not False
    prompt = body.prompt
    try:
        if isinstance(prompt, str):
            return [(prompt, encode_bounded(tokenizer, prompt, add_special, max_model_len))]
        if all(isinstance(p, str) for p in prompt):
            return [(p, encode_bounded(tokenizer, p, add_special, max_model_len))
                    for p in prompt if isinstance(p, str)]
    except PromptTooLongError as e:
        raise APIError(400, str(e), "prompt") from None
    if all(isinstance(t, int) for t in prompt):
        return [(None, [t for t in prompt if isinstance(t, int)])]
    return [(None, list(p)) for p in prompt if isinstance(p, list)]


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", response_model=None, tags=["generation"],
              responses={200: {"model": CompletionResponse, "description":
                               "A completion, or with stream=true text/event-stream chunks "
                               "of the same shape ending in 'data: [DONE]'"},
                         **ERROR_RESPONSES})
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """Complete one or more prompts (OpenAI's legacy completions API)."""
        model = resolve_model(state, body.model)
        structured = structured_constraint(body)
        try:
            body.check_streaming()
            params = body.sampling_params(body.logprobs, body.max_tokens, structured,
                                          state.sampling_defaults)
            if body.echo and body.logprobs is not None:
                params = params.clone(
                    prompt_logprobs=max(body.logprobs, params.prompt_logprobs or 0))
        except ValueError as e:
            raise bad_value(e) from None
        check_vocab_ids(state, params)
        priority = check_priority(state, body.priority)
        # A prompt list becomes as many engine requests as prompts times n: they count
        # against the same bound as n (and later the queue bound), before any tokenizing.
        num_prompts = _num_prompts(body.prompt)
        if num_prompts * params.n > MAX_N:
            raise APIError(400, f"the request asks for {num_prompts} prompts x n={params.n} "
                           f"= {num_prompts * params.n} sequences; at most {MAX_N} per "
                           "request", "prompt")
        prompts = [prepare_prompt(state, text, ids, params, "prompt", "max_tokens")
                   for text, ids in _prompts(body, state.tokenizer, state.max_model_len)]
        rid, client_chose_id = response_id(request, "cmpl-")
        gen = Generation(state, rid, client_chose_id, prompts, priority)
        fmt = CompletionFormatter(gen, model, state.tokenizer, bool(body.echo), body.logprobs,
                                  body.prompt_logprobs)
        return await respond(request, gen, fmt, bool(body.stream), body.include_usage)
