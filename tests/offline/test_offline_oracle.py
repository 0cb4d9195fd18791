"""The offline LLM against Hugging Face transformers on the same random weights.

Every supported architecture: greedy tokens identical for 32 new tokens in float32 and
logprobs within 1e-4; the same prompt alone and inside a batch of mixed lengths; prefix-cache
hits and preemption do not change tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.models import hf_greedy, make_tiny_model, random_prompt

from vserve import LLM, SamplingParams

ARCHS = [
    ("llama", {}),
    ("llama3", {}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("llama", {"tie_word_embeddings": True}),
]
NEW_TOKENS = 32


@pytest.mark.parametrize("arch,kw", ARCHS, ids=[a + ("-tied" if k else "") for a, k in ARCHS])
def test_greedy_matches_transformers(tmp_path, arch, kw):
    model_dir = make_tiny_model(tmp_path / arch, arch, **kw)
    rng = random.Random(hash(arch) & 0xFFFF)
    prompts = [random_prompt(rng, n) for n in (7, 19, 33)]
    expected = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    # A small block size so prompts span several blocks and the batch shares none.
    with LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=256,
             max_model_len=512) as llm:
        alone = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                 for p in prompts]
        batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        # Second time round the prompts' full blocks come from the prefix cache.
        cached = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                              use_tqdm=False)
    for (tokens, logprobs), a, b, c in zip(expected, alone, batched, cached):
        assert a.outputs[0].token_ids == tokens
        assert b.outputs[0].token_ids == tokens
        assert c.outputs[0].token_ids == tokens
        assert c.num_cached_tokens > 0
        got = [lp[t].logprob for lp, t in zip(a.outputs[0].logprobs, tokens)]
        assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4
        assert a.outputs[0].finish_reason == "length"


def test_preemption_keeps_tokens(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    rng = random.Random(7)
    prompts = [random_prompt(rng, rng.randrange(10, 30)) for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=400,
             max_model_len=128) as roomy:
        expected = [o.outputs[0].token_ids for o in
                    roomy.generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)]
    # 40 blocks of 4 tokens cannot hold six sequences of up to 70 tokens: some are preempted
    # and recomputed.
    with LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=40, max_model_len=128,
             enable_prefix_caching=False) as tight:
        got = [o.outputs[0].token_ids for o in
               tight.generate([{"prompt_token_ids": p} for p in prompts], params,
                              use_tqdm=False)]
        stats = tight.engine_stats()
    assert got == expected
    assert stats.num_preemptions > 0


def test_chunked_prefill_matches_whole(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "qwen3")
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (50, 90, 13)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    with LLM(str(model_dir), dtype="float32", max_num_batched_tokens=4096) as whole:
        expected = [o.outputs[0].token_ids for o in whole.generate(inputs, params,
                                                                   use_tqdm=False)]
    with LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16,
             enable_prefix_caching=False) as chunked:
        got = [o.outputs[0].token_ids for o in chunked.generate(inputs, params,
                                                                use_tqdm=False)]
    assert got == expected


def test_prompt_logprobs_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "m", "qwen2")
    prompt = random_prompt(random.Random(5), 21)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    expected = [ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    # A chunk budget smaller than the prompt: prompt logprobs arrive in pieces.
    with LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    got = [row[t].logprob for row, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
    for row in out.prompt_logprobs[1:]:
        assert 3 <= len(row) <= 4  # the token itself plus the top 3
