"""Request bodies of the HTTP API: pydantic models that accept exactly what vserve implements.

Invariants:

* every model forbids unknown fields (``extra="forbid"``), so a parameter vserve does not
  implement is a 400 naming it, never silently ignored; known-but-unimplemented OpenAI fields
  get a "not supported" message (``errors.UNSUPPORTED_FIELDS``), and fields that are accepted
  only in their no-op form (``response_format: {"type": "text"}``, ``best_of: 1``,
  ``store: false``) are validated here;
* ``null`` means "the default" for every optional field, as in OpenAI's API;
* integers that reach the engine are bounded here (no overflow in msgpack) and floats must be
  finite; the ranges themselves are checked by ``SamplingParams`` (``to_sampling_params``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vserve.protocol.sampling import SamplingParams

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_N = 128  # OpenAI's limit on choices per request


class FieldError(ValueError):
    """A ValueError that knows which field it is about (``errors`` reports it as param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _find_lone_surrogate(value: Any) -> str | None:
    """The path of a string holding a lone surrogate (JSON allows "\\ud800"; no
    tokenizer or encoder accepts it), or None. Iterative: JSON may nest deeper than the
    interpreter's recursion limit allows from inside a request handler."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            for key, sub in item.items():
                sub_path = f"{path}.{key}" if path else str(key)
                stack.append((sub, sub_path))
                stack.append((key, sub_path))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Body(_Strict):
    """A whole request body: its strings must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = _find_lone_surrogate(data)
        if path is not None:
            raise FieldError(path, f"{path} is not valid Unicode text (a lone surrogate)")
        return data


class StreamOptions(_Strict):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with the usage and empty choices before [DONE].")


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("stop must be a string or a list of strings")


class _Generation(_Body):
    """Fields shared by completions and chat completions (OpenAI's plus vLLM's extras)."""

    model: str | None = Field(None, description="A served model name; default: the first.")
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = Field(None, description="vLLM extra; 0 or -1 disables.")
    min_p: float | None = Field(None, description="vLLM extra.")
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, description="vLLM extra.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) → bias in [-100, 100].")
    max_tokens: Int64 | None = Field(
        None, description="Default: whatever room the context window leaves.")
    min_tokens: Int64 | None = Field(None, description="vLLM extra.")
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = Field(None, description="vLLM extra.")
    ignore_eos: bool | None = Field(None, description="vLLM extra.")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM extra.")
    skip_special_tokens: bool | None = Field(None, description="vLLM extra.")
    spaces_between_special_tokens: bool | None = Field(None, description="vLLM extra.")
    prompt_logprobs: Int32 | None = Field(None, description="vLLM extra; not with stream.")
    priority: Int32 | None = Field(None, description="vLLM extra; needs the priority policy.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Informational; accepted and not used.")

    _check_stop = field_validator("stop", mode="before")(_check_stop)

    def sampling_params(self, logprobs: int | None, max_tokens: int | None) -> SamplingParams:
        """The request's SamplingParams (raises ValueError naming a field)."""

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        return SamplingParams(
            n=pick(self.n, 1),
            temperature=pick(self.temperature, 1.0),
            top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0),
            min_p=pick(self.min_p, 0.0),
            seed=self.seed,
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            logit_bias=bias,
            max_tokens=max_tokens,
            min_tokens=pick(self.min_tokens, 0),
            stop=stop or None,
            stop_token_ids=self.stop_token_ids or None,
            ignore_eos=pick(self.ignore_eos, False),
            include_stop_str_in_output=pick(self.include_stop_str_in_output, False),
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=pick(self.skip_special_tokens, True),
            spaces_between_special_tokens=pick(self.spaces_between_special_tokens, True),
        )

    def check_streaming(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported with stream")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _check_prompt_shape(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("prompt must not be empty")
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in p) for p in value):
            return value
    raise ValueError("prompt must be a string, a list of strings, a non-empty list of token "
                     "ids or a list of non-empty token-id lists")


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, token ids, or a list of token-id lists.")
    echo: bool | None = Field(None, description="Prepend the prompt to each choice's text.")
    logprobs: Int32 | None = Field(None, description="Top log-probabilities per token, 0..20.")
    add_special_tokens: bool | None = Field(None, description="vLLM extra; default true.")
    best_of: Int32 | None = Field(None, description="Only 1 (the default) is supported.")
    suffix: str | None = Field(None, description="Not supported: rejected when set.")

    _check_prompt = field_validator("prompt", mode="before")(_check_prompt_shape)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("suffix is not supported by vserve")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("best_of other than 1 is not supported by vserve")
        return value


def _check_content(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}; only text parts are "
                                 "supported")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part {i} must be {{'type': 'text', 'text': str}}")
        return value
    raise ValueError("content must be a string, a list of text parts, or null")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    _check_content = field_validator("content", mode="before")(_check_content)

    def as_template_input(self) -> dict[str, Any]:
        content: Any = self.content
        if isinstance(content, list):
            content = [{"type": "text", "text": p.text} for p in content]
        msg: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ResponseFormat(_Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"response_format of type {value!r} is not supported by vserve "
                             "(only 'text')")
        return value


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Int32 | None = Field(None, description="0..20; needs logprobs: true.")
    max_completion_tokens: Int64 | None = Field(None, description="Wins over max_tokens.")
    add_generation_prompt: bool | None = Field(None, description="vLLM extra; default true.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")
    modalities: list[str] | None = Field(None, description="Only ['text'].")
    store: bool | None = Field(None, description="Only false.")
    metadata: dict[str, str] | None = Field(None, description="Informational.")
    safety_identifier: str | None = Field(None, description="Informational.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted as a hint; prefix caching is automatic.")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError("only the 'text' modality is supported by vserve")
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("store is not supported by vserve")
        return value

    def output_logprobs(self) -> int | None:
        """SamplingParams.logprobs for this request (raises ValueError naming the field)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if not self.logprobs:
            return None
        return 0 if self.top_logprobs is None else self.top_logprobs


class TokenizeRequest(_Body):
    """``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = Field(None, description="With messages; default true.")
    add_special_tokens: bool | None = Field(
        None, description="Default: true for a prompt, false for messages (the template has "
                          "them).")
    return_token_strs: bool | None = None


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[Int64]
