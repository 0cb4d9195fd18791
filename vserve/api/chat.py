"""``POST /v1/chat/completions``.

The messages are rendered with the model's chat template (or ``--chat-template``) in the
tokenizer's jinja sandbox and encoded without adding special tokens (the template holds
them). Streaming sends, first, one chunk per choice with ``{"role": "assistant",
"content": ""}``, then content chunks; ``max_completion_tokens`` wins over ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from vserve.api.errors import APIError, bad_value
from vserve.api.generation import (
    Generation,
    check_priority,
    check_vocab_ids,
    prepare_prompt,
    resolve_model,
    response_id,
)
from vserve.api.logprobs import chat_logprobs, filter_rows, prompt_logprobs_json
from vserve.api.protocol import ChatCompletionRequest
from vserve.api.responses import ERROR_RESPONSES, ChatCompletionResponse
from vserve.api.serving import respond
from vserve.api.state import ServerState
from vserve.frontend.input_processor import PromptTooLongError, encode_bounded
from vserve.frontend.output_processor import CompletionDelta
from vserve.outputs import PositionLogprobs


class ChatFormatter:
    def __init__(self, gen: Generation, model: str, logprobs: int | None,
                 prompt_logprobs: int | None) -> None:
        self.gen = gen
        self.k = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.head = {"id": gen.response_id, "object": "chat.completion.chunk",
                     "created": gen.created, "model": model}

    def _logprobs(self, token_ids: list[int], rows: list[PositionLogprobs] | None
                  ) -> dict[str, Any] | None:
        if self.k is None or not token_ids:
            return None
        return {"content": chat_logprobs(token_ids, list(rows or []), self.k)}

    def prelude(self) -> list[dict[str, Any]]:
        return [{**self.head, "choices": [{
            "index": child.index, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None}]} for child in self.gen.children]

    def chunk(self, delta: CompletionDelta, token_ids: list[int], text: str,
              logprobs: list[PositionLogprobs] | None) -> dict[str, Any]:
        choice = {"index": delta.index, "delta": {"content": text} if text else {},
                  "logprobs": self._logprobs(token_ids, logprobs),
                  "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
        return {**self.head, "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": usage}

    def response(self) -> dict[str, Any]:
        choices = []
        for child in self.gen.children:
            st = child.state
            lp = None
            if self.k is not None:
                lp = {"content": chat_logprobs(st.token_ids, st.logprobs or [], self.k)}
            choices.append({"index": child.index,
                            "message": {"role": "assistant", "content": st.text},
                            "logprobs": lp, "finish_reason": st.finish_reason,
                            "stop_reason": st.stop_reason})
        body: dict[str, Any] = {**self.head, "object": "chat.completion", "choices": choices,
                                "usage": self.gen.usage()}
        if self.prompt_logprobs is not None:
            rows = filter_rows(self.gen.children[0].state.prompt_logprobs or [],
                               self.prompt_logprobs)
            body["prompt_logprobs"] = prompt_logprobs_json(rows)
        return body


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions", response_model=None, tags=["generation"],
              responses={200: {"model": ChatCompletionResponse, "description":
                               "A chat completion, or with stream=true text/event-stream "
                               "chat.completion.chunk events ending in 'data: [DONE]'"},
                         **ERROR_RESPONSES})
    async def create_chat_completion(body: ChatCompletionRequest,
                                     request: Request) -> Response:
        """Generate the assistant's reply to a conversation."""
        model = resolve_model(state, body.model)
        max_param = "max_tokens"
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            max_param, max_tokens = "max_completion_tokens", body.max_completion_tokens
        try:
            body.check_streaming()
            logprobs = body.output_logprobs()
            params = body.sampling_params(logprobs, max_tokens)
        except ValueError as e:
            raise bad_value(e, {"max_tokens": max_param, "logprobs": "top_logprobs"}) from None
        check_vocab_ids(state, params)
        priority = check_priority(state, body.priority)
        tokenizer = state.tokenizer
        try:
            text = tokenizer.apply_chat_template(
                [m.as_template_input() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt is not False)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        try:
            ids = encode_bounded(tokenizer, text, False, state.max_model_len)
        except PromptTooLongError as e:
            raise APIError(400, str(e), "messages") from None
        prompt = prepare_prompt(state, text, ids, params, "messages", max_param)
        rid, client_chose_id = response_id(request, "chatcmpl-")
        gen = Generation(state, rid, client_chose_id, [prompt], priority)
        fmt = ChatFormatter(gen, model, logprobs, body.prompt_logprobs)
        return await respond(request, gen, fmt, bool(body.stream), body.include_usage)
