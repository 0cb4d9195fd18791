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

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vserve.protocol.sampling import SamplingParams, StructuredOutput
from vserve.structured.grammar import json_schema

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


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(_Strict):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (enforced by a
    grammar in the engine)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("response_format.json_schema",
                             "response_format.json_schema is required with type json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise FieldError("response_format.json_schema", "response_format.json_schema is "
                             "only allowed with type json_schema")
        return self


class StructuredOutputsParams(_Strict):
    """vLLM's ``structured_outputs``: exactly one of its constraints."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if k == "json" else k) not in (None, False)]
        if len(given) != 1:
            raise FieldError("structured_outputs", "structured_outputs needs exactly one of "
                             "json, regex, choice, grammar, json_object; got "
                             + (", ".join(given) or "none"))
        return self


def structured_output_of(response_format: ResponseFormat | None,
                         structured: StructuredOutputsParams | None
                         ) -> tuple[StructuredOutput | None, str]:
    """The request's output constraint and the field that set it; raises FieldError."""
    fmt = response_format if response_format is not None and response_format.type != "text" \
        else None
    if fmt is not None and structured is not None:
        raise FieldError("structured_outputs", "structured_outputs cannot be combined with "
                         f"response_format of type {fmt.type!r}")
    if fmt is not None:
        if fmt.type == "json_object":
            return json_schema({"type": "object"}), "response_format"
        assert fmt.json_schema is not None
        schema = fmt.json_schema.schema_
        return json_schema(schema if schema is not None else {}), \
            "response_format.json_schema.schema"
    if structured is None:
        return None, ""
    if structured.json_ is not None:
        if isinstance(structured.json_, str):
            return StructuredOutput("json", structured.json_), "structured_outputs.json"
        return json_schema(structured.json_), "structured_outputs.json"
    if structured.regex is not None:
        return StructuredOutput("regex", structured.regex), "structured_outputs.regex"
    if structured.choice is not None:
        return StructuredOutput("choice", json.dumps(structured.choice)), \
            "structured_outputs.choice"
    if structured.grammar is not None:
        return StructuredOutput("grammar", structured.grammar), "structured_outputs.grammar"
    return json_schema({"type": "object"}), "structured_outputs.json_object"


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
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema (enforced by a grammar).")
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="vLLM extra: exactly one of json, regex, choice, grammar, "
                          "json_object.")

    _check_stop = field_validator("stop", mode="before")(_check_stop)

    def sampling_params(self, logprobs: int | None, max_tokens: int | None,
                        structured: StructuredOutput | None = None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The request's SamplingParams (raises ValueError naming a field). ``defaults``
        (the model's generation config) fill temperature, top_p, top_k, min_p and
        repetition_penalty when unset; its max_tokens is applied by ``prepare_prompt``."""
        model = defaults or {}

        def pick(value: Any, default: Any, name: str = "") -> Any:
            if value is not None:
                return value
            return model.get(name, default) if name else default

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
            temperature=pick(self.temperature, 1.0, "temperature"),
            top_p=pick(self.top_p, 1.0, "top_p"),
            top_k=pick(self.top_k, 0, "top_k"),
            min_p=pick(self.min_p, 0.0, "min_p"),
            seed=self.seed,
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0, "repetition_penalty"),
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
            structured=structured,
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


class ToolCallFunction(_Strict):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Assistant messages only.")
    tool_call_id: str | None = Field(None, description="Tool messages: the call answered.")

    _check_content = field_validator("content", mode="before")(_check_content)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only allowed in assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id is only allowed in tool messages")
        return self

    def as_template_input(self) -> dict[str, Any]:
        content: Any = self.content
        if isinstance(content, list):
            content = [{"type": "text", "text": p.text} for p in content]
        msg: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            # Templates index into the arguments (HF convention): a dict when it is JSON.
            calls = []
            for call in self.tool_calls:
                try:
                    args: Any = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    args = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema (an object).")
    strict: bool | None = Field(None, description="Accepted; forced calls always validate.")


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Int32 | None = Field(None, description="0..20; needs logprobs: true.")
    max_completion_tokens: Int64 | None = Field(None, description="Wins over max_tokens.")
    add_generation_prompt: bool | None = Field(None, description="vLLM extra; default true.")
    modalities: list[str] | None = Field(None, description="Only ['text'].")
    store: bool | None = Field(None, description="Only false.")
    metadata: dict[str, str] | None = Field(None, description="Informational.")
    safety_identifier: str | None = Field(None, description="Informational.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted as a hint; prefix caching is automatic.")
    tools: list[ToolDefinition] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with --enable-auto-tool-choice, else none.")
    parallel_tool_calls: bool | None = Field(None, description="Default true.")

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
