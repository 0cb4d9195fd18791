"""A float8 KV cache (``kv_cache_dtype="fp8"``) against Hugging Face transformers whose
attention sees the same rounding: keys (after RoPE) and values divided by their layer's scale
(1, or an FP8 checkpoint's ``k_scale``/``v_scale``), passed through float8 e4m3 (clamped to
+-448) and multiplied back before attention, as vserve stores and reads them. Greedy tokens
identical and logprobs close in float32; the cache holds twice the tokens in the same memory;
the rounding does happen (the answers differ from a 32-bit cache's), and so do the scales."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers.models import (
    hf_greedy,
    make_tiny_model,
    random_prompt,
    write_dequantized,
    write_fp8_checkpoint,
)

from vserve import LLM, SamplingParams
from vserve.attention.backend import to_cache_dtype

NEW_TOKENS = 24
SCALES = [(0.37, 0.053), (1.9, 0.011)]  # the tiny models' two layers: keys, values


def _fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (to_cache_dtype(x, torch.float8_e4m3fn, scale).float() * scale).to(x.dtype)


@contextmanager
def _hf_fp8_kv(scales: list[tuple[float, float]] | None = None) -> Iterator[None]:
    """transformers with the keys (rotated) and values that enter its KV cache rounded
    through float8, by layer ``i``'s ``scales[i]`` (1 without)."""
    from transformers.cache_utils import DynamicCache

    update = DynamicCache.update

    def rounded(self, k, v, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        ks, vs = scales[layer_idx] if scales else (1.0, 1.0)
        return update(self, _fp8(k, ks), _fp8(v, vs), layer_idx, *args, **kwargs)

    DynamicCache.update = rounded  # type: ignore[method-assign]
    try:
        yield
    finally:
        DynamicCache.update = update  # type: ignore[method-assign]


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_cache_matches_transformers_with_rounded_kv(tmp_path, device):
    """On CUDA: the Triton kernels (decode graphs, mixed-step graphs) in float32."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    rng = random.Random(11)
    prompts = [random_prompt(rng, n) for n in (9, 26)]
    with _hf_fp8_kv():
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


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "checkpoint-scales"])
def test_tp2_fp8_cache_matches_transformers_with_rounded_kv(tmp_path, scaled):
    """Tensor parallel on CPU: each rank stores its own KV heads in float8 (the rounding is
    per element and the scales per layer, so the split changes nothing)."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    reference = model_dir
    if scaled:
        model_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", kv_scales=SCALES)
        reference = write_dequantized(model_dir, tmp_path / "ref")
    prompt = random_prompt(random.Random(4), 21)
    with _hf_fp8_kv(SCALES if scaled else None):
        tokens, logprobs = hf_greedy(reference, prompt, NEW_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    with LLM(str(model_dir), dtype="float32", tensor_parallel_size=2, kv_cache_dtype="fp8",
             num_kv_blocks=128, block_size=4, max_model_len=128) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens
    got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
    assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("names", ["attn", "proj"])
def test_checkpoint_kv_scales_match_transformers(tmp_path, device, names):
    """An FP8 checkpoint with a ``kv_cache_scheme`` (llm-compressor's per-tensor scales, both
    tensor namings): with ``kv_cache_dtype="fp8"`` the cache stores ``k / k_scale`` and reads
    ``fp8 * k_scale`` (transformers on the dequantized weights, rounding the same way, is the
    oracle, and rounding with scale 1 would not match it); without the flag the scales load
    and a 32-bit cache ignores them."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    # Weight-only: CUDA multiplies the dequantized weights in float32 as the oracle does
    # (dynamic activations would quantize them for the float8 tensor cores, a 1e-2 change
    # that has nothing to do with the cache).
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", kv_scales=SCALES,
                                   kv_scale_names=names, activations=None)
    reference = write_dequantized(fp8_dir, tmp_path / "ref")
    prompt = random_prompt(random.Random(8), 17)
    with _hf_fp8_kv(SCALES):
        tokens, logprobs = hf_greedy(reference, prompt, NEW_TOKENS)
    with _hf_fp8_kv():
        _, unscaled = hf_greedy(reference, prompt, NEW_TOKENS)
    exact_tokens, exact = hf_greedy(reference, prompt, NEW_TOKENS)
    assert max(abs(x - y) for x, y in zip(logprobs, unscaled)) > 1e-3  # the scales matter
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", block_size=4, max_model_len=128, device=device,
              num_kv_blocks=256)
    for kv, want_tokens, want in (("fp8", tokens, logprobs), ("auto", exact_tokens, exact)):
        with LLM(str(fp8_dir), kv_cache_dtype=kv, **kw) as llm:
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want_tokens, kv
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, want_tokens)]
        assert max(abs(x - y) for x, y in zip(got, want)) < 1e-4, kv


def test_checkpoint_kv_scales_missing_or_bad_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = make_tiny_model(tmp_path / "m", "llama")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", kv_scales=SCALES)
    (file,) = fp8_dir.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.v_scale"]
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor([-1.0])
    save_file(tensors, str(file))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.k_scale: a KV-cache "
                                           r"scale must be one positive number.*left "
                                           r"unloaded: .*model\.layers\.1\.self_attn\.v_scale"):
        LLM(str(fp8_dir), kv_cache_dtype="fp8", num_kv_blocks=64)
