"""Response bodies as pydantic models: the OpenAPI document's description of what comes back.

The handlers build plain dicts on the hot path (no model instance per response or chunk);
these models document those dicts, and the tests validate real responses against them
(``extra="forbid"``), so the document cannot drift from what the server sends.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(_Out):
    error: ErrorInfo


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(_Out):
    logprob: float
    rank: int | None
    decoded_token: str | None


# Entry i: token id (as a string) → its logprob at prompt position i; entry 0 is null.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Out):
    """Also the shape of each streamed chunk (``usage`` only on the last, when asked for)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatLogprob] | None


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Out):
    prompt: str


class VersionResponse(_Out):
    version: str


class HealthResponse(_Out):
    status: Literal["healthy", "unhealthy"]
    engines_down: list[int]  # ranks of engines that are not serving


class ReadyResponse(_Out):
    status: Literal["ready", "starting", "draining", "unhealthy"]


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in (
        (400, "Invalid request: a schema violation, malformed JSON or an invalid value"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (503, "Draining, overloaded (with Retry-After) or an engine is down"),
    )
}
