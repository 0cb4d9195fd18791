"""A float8 KV cache (``kv_cache_dtype="fp8"``) against Hugging Face transformers whose
attention sees the same rounding: keys (after RoPE) and values passed through float8 e4m3
(clamped to +-448, unscaled) before attention, as vserve stores them. Greedy tokens identical
and logprobs close in float32; the cache holds twice the tokens in the same memory; and the
rounding does happen (the answers differ from a 32-bit cache's)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers.models import hf_greedy, make_tiny_model, random_prompt

from vserve import LLM, SamplingParams
from vserve.attention.backend import to_cache_dtype

NEW_TOKENS = 24


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return to_cache_dtype(x, torch.float8_e4m3fn).to(x.dtype)


@contextmanager
def _hf_fp8_kv(model_dir: Path) -> Iterator[None]:
    """transformers' Llama with its rotated keys and its values rounded through float8."""
    import transformers.models.llama.modeling_llama as llama

    rotate = llama.apply_rotary_pos_emb

    def rounded(q, k, cos, sin, *args, **kwargs):  # type: ignore[no-untyped-def]
        q, k = rotate(q, k, cos, sin, *args, **kwargs)
        return q, _fp8(k)

    original_init = llama.LlamaAttention.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self.v_proj.register_forward_hook(lambda _m, _i, out: _fp8(out))

    llama.apply_rotary_pos_emb = rounded
    llama.LlamaAttention.__init__ = init
    try:
        yield
    finally:
        llama.apply_rotary_pos_emb = rotate
        llama.LlamaAttention.__init__ = original_init


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_matches_transformers_with_rounded_kv(tmp_path, device):
    """On CUDA: the Triton kernels (decode graphs, mixed-step graphs) in float32."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    rng = random.Random(11)
    prompts = [random_prompt(rng, n) for n in (9, 26)]
    with _hf_fp8_kv(model_dir):
        expected = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    exact = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", block_size=4, max_model_len=256, device=device,
              kv_cache_memory_bytes=4 << 20, gpu_memory_utilization=0.3)
    with LLM(str(model_dir), kv_cache_dtype="fp8", **kw) as llm:
        fp8_blocks = llm.num_kv_blocks
        batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        # Again: the prompts' full blocks now come from the (float8) prefix cache.
        cached = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                              use_tqdm=False)
    with LLM(str(model_dir), **kw) as wide:
        wide_blocks = wide.num_kv_blocks
    # One byte per element against four: the same budget holds four times the blocks (on
    # CUDA the budget is what memory profiling leaves, nearly the same in both runs).
    if device == "cpu":
        assert fp8_blocks == 4 * wide_blocks, (fp8_blocks, wide_blocks)
    else:
        assert 3.9 * wide_blocks < fp8_blocks < 4.1 * wide_blocks, (fp8_blocks, wide_blocks)
    moved = 0.0
    for (tokens, logprobs), (_, exact_lps), a, c in zip(expected, exact, batched, cached):
        for out in (a, c):
            assert out.outputs[0].token_ids == tokens
            got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
            assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4
        assert c.num_cached_tokens > 0
        moved = max(moved, max(abs(x - y) for x, y in zip(logprobs, exact_lps)))
    assert moved > 1e-2, "rounding the keys and values changed nothing: is the oracle rounding?"


def test_fp8_cache_option_is_validated():
    from vserve.config import CacheConfig

    assert CacheConfig(kv_cache_dtype="fp8_e4m3").kv_cache_fp8
    assert not CacheConfig().kv_cache_fp8
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")  # type: ignore[arg-type]


def test_tp2_fp8_cache_matches_transformers_with_rounded_kv(tmp_path):
    """Tensor parallel on CPU: each rank stores its own KV heads in float8 (the rounding is
    per element, so the split changes nothing)."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    prompt = random_prompt(random.Random(4), 21)
    with _hf_fp8_kv(model_dir):
        tokens, logprobs = hf_greedy(model_dir, prompt, NEW_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    with LLM(str(model_dir), dtype="float32", tensor_parallel_size=2, kv_cache_dtype="fp8",
             num_kv_blocks=128, block_size=4, max_model_len=128) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens
    got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
    assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4
