"""Sampling parameters: what a request asks of the sampler and the stop checks.

Light on imports on purpose (msgspec only): API servers build these without torch.
"""

from __future__ import annotations

import msgspec

_SAMPLING_EPS = 1e-5


class StructuredOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on a request's whole output, compiled into a grammar by the engine.

    ``kind``: ``json`` (``spec`` is a JSON schema, as JSON text), ``regex``, ``choice``
    (``spec`` is a JSON list of strings), ``grammar`` (Lark or GBNF/EBNF text). The
    front end validates it before it reaches an engine (``vserve.structured.grammar``).
    """

    kind: str
    spec: str


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


class SamplingParams(
    msgspec.Struct, omit_defaults=True, kw_only=True, dict=False, forbid_unknown_fields=True
):
    """Per-request sampling and stopping parameters (vLLM-compatible names).

    ``validate()`` raises ``ValueError`` naming the offending field; it runs on construction
    (``__post_init__``), so a SamplingParams that exists is a valid one.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field} {why}")

        if self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be -1 (disable), 0 (disable) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be at least 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                "min_tokens",
                f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must fit in a signed 64-bit integer")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if tok < 0:
                    raise bad("logit_bias", f"has a negative token id {tok}")
                if not -100.0 <= bias <= 100.0:
                    raise bad("logit_bias", f"value for token {tok} must be in [-100, 100]")
        if self.stop is not None:
            for s in self.stop:
                if not isinstance(s, str) or s == "":
                    raise bad("stop", "must contain only non-empty strings")
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if t < 0:
                    raise bad("stop_token_ids", f"has a negative token id {t}")
        if self.structured is not None and self.structured.kind not in STRUCTURED_KINDS:
            raise bad("structured", f"kind must be one of {', '.join(STRUCTURED_KINDS)}, got "
                                    f"{self.structured.kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def clone(self, **changes: object) -> SamplingParams:
        return msgspec.structs.replace(self, **changes)
