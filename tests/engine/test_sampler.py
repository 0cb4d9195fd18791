"""The sampler's draws (``vserve.worker.sampler``, ``vserve.worker.gumbel``) on CPU.

Distributions are checked with a chi-square test against the softmax the parameters define,
over many rows of one batch; the thresholds are far in the tail (p < 1e-6 for a correct
sampler) and the engine's stream is seeded, so the tests are deterministic, yet a sampler
that ignores the temperature, a filter or the noise fails them by orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vserve.core.request import Request
from vserve.protocol.sampling import SamplingParams
from vserve.worker.gumbel import MIX_A, MIX_B, seeded_key, seeded_keys, uniform_from_hash
from vserve.worker.sampler import Sampler

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, float("-inf")])


def _requests(n: int, **params: object) -> list[Request]:
    return [Request(f"r{i}", [1, 2, 3], SamplingParams(**params), [0]) for i in range(n)]


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    assert torch.all(counts[expected == 0] == 0), "a token outside the support was drawn"
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _python_hash(key: int, token: int) -> float:
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * MIX_A) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * MIX_B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key &= (1 << 64) - 1
    h = mix(mix(token ^ (key & 0xFFFFFFFF)) ^ (key >> 32))
    return ((h >> 9) * 2 + 1) * 2.0 ** -24


def test_noise_integers_match_their_definition():
    """The tensor hash (int64 products masked to 32 bits) equals plain integer arithmetic,
    for keys of both signs and the largest token ids."""
    keys = [0, 1, -1, seeded_key(7, 0), seeded_key(2**63 + 5, 12), -(2**63)]
    u = uniform_from_hash(torch.tensor(keys, dtype=torch.int64), 200_000)
    for r, key in enumerate(keys):
        for t in (0, 1, 31, 65_535, 65_536, 128_255, 199_999):
            assert u[r, t].item() == _python_hash(key, t), (key, t)
    assert 0 < u.min().item() and u.max().item() < 1
    # The sampler's vectorized keys are the scalar definition's.
    seeds, draws = [0, 1, 7, 2**64 - 1, 2**63 + 5, 12345], [0, 3, 12, 99, 1, 2**40]
    assert seeded_keys(np.array(seeds, dtype=np.uint64), np.array(draws, dtype=np.uint64)
                       ).tolist() == [seeded_key(s, d) for s, d in zip(seeds, draws)]
    # Uniform in mean and spread (1.6M draws).
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 2e-3


@pytest.mark.parametrize("params,probs", [
    ({"temperature": 1.0}, LOGITS.softmax(-1)),
    ({"temperature": 0.5}, (LOGITS / 0.5).softmax(-1)),
    ({"temperature": 2.0, "top_k": 3}, torch.cat([(LOGITS[:3] / 2).softmax(-1),
                                                   torch.zeros(5)])),
    ({"temperature": 1.0, "top_p": 0.8}, torch.cat([LOGITS[:3].softmax(-1), torch.zeros(5)])),
    ({"temperature": 1.0, "min_p": 0.2}, torch.cat([LOGITS[:3].softmax(-1), torch.zeros(5)])),
])
def test_draws_follow_the_requested_distribution(params, probs):
    rows = 20_000
    sampler = Sampler(torch.device("cpu"), base_seed=1)
    tokens = sampler(LOGITS.repeat(rows, 1), _requests(rows, **params)).sampled
    # 7 degrees of freedom at most: chi-square 40 is p ~ 1e-6.
    assert _chi_square(tokens, probs) < 40, params


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = torch.randn(12, 1000, generator=torch.Generator().manual_seed(0)) * 2
    alone = Sampler(torch.device("cpu"))
    x = Request("x", [1], SamplingParams(seed=42), [0])
    first = [alone(logits[2:3], [x]).sampled[0] for _ in range(20)]
    assert x.num_draws == 20
    mixed = Sampler(torch.device("cpu"), base_seed=9)
    # Eleven seeded rows: their keys take the vectorized path, the lone row's the scalar one.
    batch = _requests(12, temperature=0.8, seed=5)
    batch[2] = Request("y", [1], SamplingParams(seed=42), [0])
    batch[4] = Request("g", [1], SamplingParams(temperature=0.0), [0])
    got = [mixed(logits, batch).sampled for _ in range(20)]
    assert [row[2] for row in got] == first
    # Each draw has its own noise: 20 draws from a near-flat row are not all one token.
    assert len(set(first)) > 5
    # The greedy row is the argmax every time, next to sampled rows.
    assert {row[4] for row in got} == {int(logits[4].argmax())}
    other = Sampler(torch.device("cpu"))
    z = Request("z", [1], SamplingParams(seed=43), [0])
    assert [other(logits[2:3], [z]).sampled[0] for _ in range(20)] != first
    # A new request with the same seed starts from the first draw, in any sampler.
    assert other(logits[2:3], [Request("x", [1], SamplingParams(seed=42), [0])]
                 ).sampled[0] == first[0]


def test_unseeded_rows_differ_and_follow_the_engine_seed():
    logits = torch.zeros(64, 1000)
    a = Sampler(torch.device("cpu"), base_seed=3)(logits, _requests(64)).sampled
    b = Sampler(torch.device("cpu"), base_seed=3)(logits, _requests(64)).sampled
    c = Sampler(torch.device("cpu"), base_seed=4)(logits, _requests(64)).sampled
    assert a == b and a != c
    assert len(set(a)) > 50  # 64 uniform draws from 1,000 tokens: ~62 distinct


def test_grammar_masks_filled_in_the_background_give_the_same_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare(background=True)`` fills the bitmasks on the grammar thread (the CUDA
    engine's path) and the synchronous fill runs on llguidance's threads (forced here: a
    2-core machine fills serially); the tokens equal those of the synchronous fill, the
    two batches' grammars complete together, and every token obeys its grammar, over 40
    steps of 48 constrained rows among 64, some filtered, some greedy."""
    from vserve.models.source import resolve_model_dir
    from vserve.protocol.sampling import StructuredOutput
    from vserve.structured import matcher
    from vserve.structured.grammar import json_schema
    from vserve.structured.matcher import StructuredOutputs, consume_tokens

    monkeypatch.setattr(matcher, "_SERIAL_ROWS", 0)

    so = StructuredOutputs(resolve_model_dir("demo"), 320, [296])
    grammars = [json_schema({"type": "object", "properties": {"a": {"type": "string"}}}),
                StructuredOutput("regex", r"[a-z]{3,40}")]
    logits_gen = torch.Generator().manual_seed(5)

    def batch(tag: str) -> list[Request]:
        reqs = []
        for i in range(64):
            kw: dict[str, object] = {"temperature": 0.0 if i % 5 == 0 else 1.0, "seed": i}
            if i % 4 == 1:
                kw["top_p"] = 0.9
            req = Request(f"{tag}{i}", [1], SamplingParams(**kw), [296])
            if i % 4 != 3:
                req.grammar = so.submit(grammars[i % 2]).result()
            reqs.append(req)
        return reqs

    background, sync = batch("b"), batch("s")
    sb, ss = Sampler(torch.device("cpu")), Sampler(torch.device("cpu"))
    backgrounds = 0
    for step in range(40):
        logits = torch.randn(64, 320, generator=logits_gen) * 3
        prepared = sb.prepare(background, 320, background=True)
        # Filled in the background above 8 rows (some grammars complete on the way).
        assert (prepared.filling is not None) == (len(prepared.grammar_rows) > 8), step
        backgrounds += prepared.filling is not None
        got = sb.sample_on_device(logits, background, prepared).tolist()
        assert got == ss.sample_on_device(logits, sync).tolist(), step
        live = [(b, s, tok) for b, s, tok in zip(background, sync, got)
                if b.grammar is not None and not b.grammar.is_stopped()]
        consume_tokens([(b.grammar, tok) for b, _, tok in live])
        for b, s, tok in live:
            assert s.grammar.consume_token(tok), (step, s.request_id, tok)
            assert not b.grammar.is_error(), (step, b.request_id, tok)
            assert b.grammar.is_stopped() == s.grammar.is_stopped()
    assert backgrounds >= 10, backgrounds
    so.shutdown()
