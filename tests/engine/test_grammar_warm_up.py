"""A compiled grammar is warmed before it is cached (``vserve.structured.matcher.warm_up``):
random rollouts build its lazily-made lexer states, then roll back. The warmed matcher must
be indistinguishable from a fresh one in what it allows, on any path, for grammars that
complete (rollouts that reach EOS) and ones that stay open."""

from __future__ import annotations

import numpy as np
import pytest
from llguidance import LLMatcher

from vserve.models.source import resolve_model_dir
from vserve.protocol.sampling import StructuredOutput
from vserve.structured.grammar import grammar_text, json_schema
from vserve.structured.matcher import StructuredOutputs, allowed_token, bitmask_width, warm_up

VOCAB = 320
GRAMMARS = [
    json_schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
                                                  "b": {"type": "integer"}},
                 "required": ["a", "b"], "additionalProperties": False}),
    json_schema({"type": "object", "properties": {"text": {"type": "string"}}}),
    StructuredOutput("regex", r"(yes|no)"),  # every rollout completes (EOS)
    StructuredOutput("choice", '["alpha", "beta", "gamma"]'),
]


def _mask(m: LLMatcher) -> np.ndarray:
    out = np.zeros(bitmask_width(VOCAB), dtype=np.int32)
    m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
    return out


@pytest.mark.parametrize("so", GRAMMARS, ids=lambda so: so.kind)
def test_warmed_matcher_allows_what_a_fresh_one_does(so: StructuredOutput) -> None:
    outputs = StructuredOutputs(resolve_model_dir("demo"), VOCAB, [296])
    text = grammar_text(so)
    warmed = LLMatcher(outputs.tokenizer(), text, log_level=0)
    assert warm_up(warmed, VOCAB)
    for seed in range(5):
        a, b = warmed.deep_copy(), LLMatcher(outputs.tokenizer(), text, log_level=0)
        rng = np.random.default_rng(seed)
        for _ in range(60):
            mask = _mask(a)
            assert np.array_equal(mask, _mask(b))
            assert a.is_stopped() == b.is_stopped() and a.is_accepting() == b.is_accepting()
            if a.is_stopped():
                break
            token = allowed_token(mask, int(rng.integers(1 << 40)))
            assert token is not None
            assert a.consume_token(token) and b.consume_token(token)
    # The cache holds warmed matchers: the engine's copies come from one.
    copy = outputs.submit(so).result()
    assert np.array_equal(_mask(copy), _mask(LLMatcher(outputs.tokenizer(), text, log_level=0)))
    outputs.shutdown()
