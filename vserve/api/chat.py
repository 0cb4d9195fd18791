"""``POST /v1/chat/completions``.

The messages are rendered with the model's chat template (or ``--chat-template``) in the
tokenizer's jinja sandbox and encoded without adding special tokens (the template holds
them). Streaming sends, first, one chunk per choice with ``{"role": "assistant",
"content": ""}``, then content chunks; ``max_completion_tokens`` wins over ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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
    structured_constraint,
)
from vserve.api.logprobs import chat_logprobs, filter_rows, prompt_logprobs_json
from vserve.api.protocol import ChatCompletionRequest, NamedToolChoice
from vserve.api.responses import ERROR_RESPONSES, ChatCompletionResponse
from vserve.api.serving import respond
from vserve.api.state import ServerState
from vserve.api.tools import (
    AUTO_STREAMS,
    NamedToolStream,
    RequiredToolStream,
    ToolStream,
    collect,
    parameters_schema,
    required_schema,
)
from vserve.frontend.input_processor import PromptTooLongError, encode_bounded
from vserve.frontend.output_processor import CompletionDelta
from vserve.outputs import PositionLogprobs
from vserve.protocol.sampling import StructuredOutput
from vserve.structured.grammar import check, json_schema


class ToolMode(NamedTuple):
    """How a request's tools shape its output (see ``vserve.api.tools``)."""

    choice: str  # none, auto, required, named
    constraint: StructuredOutput | None
    stream: Callable[[], ToolStream] | None  # reads tool calls out of each choice's text


NO_TOOLS = ToolMode("none", None, None)


def tool_mode(body: ChatCompletionRequest, state: ServerState) -> ToolMode:
    """The request's tool mode; raises APIError(400) naming the field."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice is not None and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if not tools:
        return NO_TOOLS
    cfg = state.server_config
    if choice is None:
        choice = "auto" if cfg.enable_auto_tool_choice else "none"
    if choice == "none":
        return NO_TOOLS
    if choice == "auto":
        if not cfg.enable_auto_tool_choice or cfg.tool_call_parser is None:
            raise APIError(400, "tool_choice 'auto' needs the server started with "
                           "--enable-auto-tool-choice and --tool-call-parser", "tool_choice")
        return ToolMode("auto", None, AUTO_STREAMS[cfg.tool_call_parser])
    if choice == "required":
        so = json_schema(required_schema(tools, body.parallel_tool_calls is not False))
        mode = ToolMode("required", so, RequiredToolStream)
    else:
        assert isinstance(choice, NamedToolChoice)
        name = choice.function.name
        match = [t for t in tools if t["function"]["name"] == name]
        if not match:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in "
                           "tools", "tool_choice.function.name")
        so = json_schema(parameters_schema(match[0]["function"]))
        mode = ToolMode("named", so, lambda: NamedToolStream(name))
    error = check(so)
    if error is not None:
        raise APIError(400, f"tools: a function's parameters schema cannot be enforced: "
                       f"{error}", "tools")
    return mode


class ChatFormatter:
    def __init__(self, gen: Generation, model: str, logprobs: int | None,
                 prompt_logprobs: int | None, tools: ToolMode = NO_TOOLS) -> None:
        self.gen = gen
        self.k = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.tools = tools
        self._streams: dict[int, ToolStream] = {}
        self.head = {"id": gen.response_id, "object": "chat.completion.chunk",
                     "created": gen.created, "model": model}

    def _finish_reason(self, reason: str | None, num_calls: int) -> str | None:
        if reason == "stop" and num_calls and self.tools.choice in ("auto", "required"):
            return "tool_calls"
        return reason

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
              logprobs: list[PositionLogprobs] | None) -> dict[str, Any] | None:
        body: dict[str, Any] = {"content": text} if text else {}
        finish = delta.finish_reason
        if self.tools.stream is not None:
            stream = self._streams.get(delta.index)
            if stream is None:
                stream = self._streams[delta.index] = self.tools.stream()
            content, calls = stream.feed(text)
            if finish is not None:
                more, tail = stream.finish()
                content, calls = content + more, calls + tail
            body = {"content": content} if content else {}
            if calls:
                body["tool_calls"] = calls
            finish = self._finish_reason(finish, stream.num_calls)
            if not body and finish is None and self.k is None:
                return None  # nothing to show yet
        choice = {"index": delta.index, "delta": body,
                  "logprobs": self._logprobs(token_ids, logprobs),
                  "finish_reason": finish, "stop_reason": delta.stop_reason}
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
            message: dict[str, Any] = {"role": "assistant", "content": st.text}
            finish = st.finish_reason
            if self.tools.stream is not None:
                content, calls = collect(self.tools.stream(), st.text)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                finish = self._finish_reason(finish, len(calls))
            choices.append({"index": child.index, "message": message,
                            "logprobs": lp, "finish_reason": finish,
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
        tools = tool_mode(body, state)
        structured = structured_constraint(body)
        if tools.constraint is not None:
            if structured is not None:
                raise APIError(400, f"tool_choice {tools.choice!r} constrains the output "
                               "itself: it cannot be combined with response_format or "
                               "structured_outputs", "tool_choice")
            structured = tools.constraint
        try:
            body.check_streaming()
            logprobs = body.output_logprobs()
            params = body.sampling_params(logprobs, max_tokens, structured,
                                          state.sampling_defaults)
        except ValueError as e:
            raise bad_value(e, {"max_tokens": max_param, "logprobs": "top_logprobs"}) from None
        check_vocab_ids(state, params)
        priority = check_priority(state, body.priority)
        tokenizer = state.tokenizer
        template_kwargs: dict[str, Any] = {}
        if body.tools:
            template_kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        try:
            text = tokenizer.apply_chat_template(
                [m.as_template_input() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt is not False,
                **template_kwargs)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        try:
            ids = encode_bounded(tokenizer, text, False, state.max_model_len)
        except PromptTooLongError as e:
            raise APIError(400, str(e), "messages") from None
        prompt = prepare_prompt(state, text, ids, params, "messages", max_param)
        rid, client_chose_id = response_id(request, "chatcmpl-")
        gen = Generation(state, rid, client_chose_id, [prompt], priority)
        fmt = ChatFormatter(gen, model, logprobs, body.prompt_logprobs, tools)
        return await respond(request, gen, fmt, bool(body.stream), body.include_usage)
