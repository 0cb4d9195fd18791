"""Tensor parallelism on CPU (gloo): ``LLM(..., tensor_parallel_size=2)`` runs the engine
process as rank 0 and one worker process as rank 1, each holding half of every layer.

Greedy tokens identical to transformers (and so to TP=1) on the architectures whose sharding
differs — split KV heads, KV heads replicated when there are fewer than ranks (Qwen2's one
KV head here, with q/k/v biases and a row-parallel bias on rank 0 only), a tied embedding as
the vocabulary-parallel head, Qwen3's q/k norms; logprobs and prompt logprobs within 1e-4;
the worker leaves with its engine; a size the model cannot split is refused by name.
"""

from __future__ import annotations

import random

import psutil
import pytest
from helpers.models import (
    hf_greedy,
    make_tiny_model,
    random_prompt,
    write_dequantized,
    write_fp8_checkpoint,
)

from vserve import LLM, SamplingParams

CASES = [
    ("llama", {}),
    ("qwen2", {"num_key_value_heads": 1}),
    ("qwen3", {}),
    ("llama", {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=["llama", "qwen2-1kv", "qwen3", "llama-tied"])
def test_tp2_greedy_matches_transformers(tmp_path, arch, kw):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / arch, arch, **kw)
    rng = random.Random(7)
    prompts = [random_prompt(rng, n) for n in (5, 23)]
    expected = [hf_greedy(model_dir, p, 16) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    with LLM(str(model_dir), dtype="float32", tensor_parallel_size=2, block_size=4,
             num_kv_blocks=128, max_model_len=256) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
    import torch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for (tokens, logprobs), out, prompt in zip(expected, outs, prompts, strict=True):
        assert out.outputs[0].token_ids == tokens
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
        assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        assert out.prompt_logprobs is not None
        got_prompt = [row[t].logprob for row, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        want_prompt = [ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
        assert max(abs(x - y) for x, y in zip(got_prompt, want_prompt)) < 1e-4


def test_tp2_keeps_tokens_through_preemption_and_chunked_prefill(tmp_path):
    """Rows freed and re-taken, block lists replaced on re-admission, prompts in chunks:
    the workers follow rank 0's block table from its recorded changes alone."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    rng = random.Random(7)
    prompts = [random_prompt(rng, rng.randrange(10, 40)) for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=400,
             max_model_len=128) as roomy:
        want = [o.outputs[0].token_ids for o in roomy.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    with LLM(str(model_dir), dtype="float32", tensor_parallel_size=2, block_size=4,
             num_kv_blocks=40, max_model_len=128, max_num_batched_tokens=16,
             enable_prefix_caching=False) as tight:
        got = [o.outputs[0].token_ids for o in tight.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
        assert tight.engine_stats().num_preemptions > 0
    assert got == want


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_tp2_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path, strategy):
    """Each rank loads its rows (q/k/v, gate/up) or columns (o, down) of the float8 weights
    with the matching slice of per-channel scales, or the whole per-tensor scale."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", strategy=strategy,
                                   activations="static" if strategy == "tensor" else "dynamic")
    reference = write_dequantized(fp8_dir, tmp_path / "ref")
    prompts = [random_prompt(random.Random(9), n) for n in (6, 19)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    with LLM(str(fp8_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=128,
             max_model_len=256) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, logprobs = hf_greedy(reference, prompt, 12)
        assert out.outputs[0].token_ids == tokens
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
        assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4


def test_tp2_demo_matches_tp1_and_leaves_no_worker(capfd: pytest.CaptureFixture[str]):
    prompts = ["Hello, my name is", "The capital of France is", "a b c d e f g h"]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    with LLM("demo") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        want_seeded = [o.outputs[0].token_ids
                       for o in llm.generate(prompts, seeded, use_tqdm=False)]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with LLM("demo", tensor_parallel_size=2) as llm:
        family = psutil.Process().children(recursive=True)
        workers = [p for p in family if p.pid not in before
                   and "vserve.engine.tp_worker" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in family]
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        got_seeded = [o.outputs[0].token_ids
                      for o in llm.generate(prompts, seeded, use_tqdm=False)]
    assert got == want
    assert got_seeded == want_seeded
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "the tensor-parallel worker outlived its engine"
    # Told to leave by its engine, not left to find its parent gone or its group broken.
    err = capfd.readouterr().err
    assert "tensor-parallel rank 1 stopped" in err, err[-3000:]
    assert "died; exiting" not in err and "rank 1 failed" not in err, err[-3000:]


def test_sizes_the_model_cannot_split_are_refused_by_name(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")  # 4 heads, 2 KV heads, vocab 320
    with pytest.raises(RuntimeError, match=r"tensor_parallel_size=3 does not divide "
                                           r"num_attention_heads \(4\)"):
        LLM(str(model_dir), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        LLM("demo", tensor_parallel_size=0)
    with pytest.raises(RuntimeError, match="benchmark_skip_compute loads no model"):
        LLM("demo", tensor_parallel_size=2, benchmark_skip_compute=True)
