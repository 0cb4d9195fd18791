"""FP8 weights on CPU, the reference path: float8 e4m3 linear weights with per-channel scales.

Oracle: transformers running the same checkpoint with its weights dequantized (``w8 *
scale``, as it decompresses FP8 checkpoints) gives the same greedy tokens, logprobs within
1e-4, for every format vserve loads and for ``--quantization fp8`` on a 16-bit checkpoint.
The FP8 model's prompt logprobs stay close to the 16-bit model's; the weights really are
float8 in memory; and every quantization_config vserve cannot run is refused by name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
from vserve.models.fp8 import FP8_DTYPE, Fp8Linear, dequantize, quantize_per_channel

FORMATS = [
    ("compressed-tensors", "channel", "dynamic"),
    ("compressed-tensors", "tensor", "static"),
    ("compressed-tensors", "channel", None),
    ("fp8", "tensor", "dynamic"),
    ("fp8", "tensor", "static"),
]


def _greedy(path: Path, prompts: list[list[int]], n: int, **kw) -> list:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1)
    with LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256, max_model_len=256,
             **kw) as llm:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)


def _assert_matches(outs: list, expected: list) -> None:
    for out, (tokens, logprobs) in zip(outs, expected, strict=True):
        assert out.outputs[0].token_ids == tokens
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
        assert max(abs(x - y) for x, y in zip(got, logprobs)) < 1e-4


def test_per_channel_quantization_error_is_bounded():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((1, 1), (7, 33), (64, 128), (300, 17)):
        w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3
        w[0, 0] = 0.0
        w8, scale = quantize_per_channel(w)
        assert w8.dtype == FP8_DTYPE and scale.shape == (n,) and bool((scale > 0).all())
        back = dequantize(w8, scale, torch.float32)
        # e4m3: 3 mantissa bits, so a normal value is within 2^-4 of itself; subnormals
        # (below 2^-6 of the scale unit) within half of their spacing, 2^-10 scale units.
        bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
        assert bool(((back - w).abs() <= bound * 1.0001).all()), (n, k)
        # Each row's largest magnitude is represented exactly: it maps to 448.
        rows = torch.arange(n)
        top = w.abs().argmax(dim=1)
        assert torch.allclose(back[rows, top].abs(), w[rows, top].abs(), rtol=1e-6)


@pytest.mark.parametrize("method,strategy,activations", FORMATS,
                         ids=[f"{m}-{s}-{a}" for m, s, a in FORMATS])
def test_fp8_checkpoints_match_transformers_on_dequantized_weights(tmp_path, method, strategy,
                                                                   activations):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", method=method,
                                   strategy=strategy, activations=activations)
    reference = write_dequantized(fp8_dir, tmp_path / "ref")
    rng = random.Random(11)
    prompts = [random_prompt(rng, n) for n in (6, 21)]
    _assert_matches(_greedy(fp8_dir, prompts, 16), [hf_greedy(reference, p, 16)
                                                    for p in prompts])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_quantization_fp8_at_load_time_matches_the_same_checkpoint_prequantized(tmp_path, arch):
    """``--quantization fp8`` on a 16-bit checkpoint quantizes per channel as it loads: the
    same weights as the per-channel FP8 checkpoint of it, so the same tokens as transformers
    on those weights dequantized (Qwen2's q/k/v biases stay 16-bit)."""
    model_dir = make_tiny_model(tmp_path / "m", arch)
    reference = write_dequantized(write_fp8_checkpoint(model_dir, tmp_path / "fp8"),
                                  tmp_path / "ref")
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (9, 30)]
    _assert_matches(_greedy(model_dir, prompts, 16, quantization="fp8"),
                    [hf_greedy(reference, p, 16) for p in prompts])


def test_fp8_prompt_logprobs_stay_close_to_16_bit(tmp_path):
    """Measured on these test models (random weights of std 0.15, prompt logprobs around
    -6.5): mean absolute difference 0.09-0.11, largest 0.31-0.42, in float32 and bfloat16."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (16, 40, 64)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for dtype in ("float32", "bfloat16"):
        model_dir = make_tiny_model(tmp_path / dtype, "llama", dtype=dtype)
        runs = []
        for quantization in (None, "fp8"):
            with LLM(str(model_dir), dtype=dtype, quantization=quantization,
                     num_kv_blocks=128, max_model_len=256) as llm:
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
            runs.append([row[t].logprob for o, p in zip(outs, prompts)
                         for row, t in zip(o.prompt_logprobs[1:], p[1:])])
        diffs = [abs(a - b) for a, b in zip(*runs, strict=True)]
        assert 0 < sum(diffs) / len(diffs) < 0.15, dtype  # 0: not quantized at all
        assert max(diffs) < 0.6, dtype


def test_fp8_weights_are_float8_in_memory(tmp_path):
    from vserve.attention.torch_ref import TorchReferenceBackend
    from vserve.models.arch import load_arch_config
    from vserve.models.loader import load_model
    from vserve.models.quant_config import LOAD_TIME_FP8

    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    arch = load_arch_config(model_dir)
    model = load_model(model_dir, arch, torch.bfloat16, torch.device("cpu"),
                       TorchReferenceBackend(), quantization=LOAD_TIME_FP8)
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 4 * arch.num_hidden_layers  # qkv, o, gate/up, down per layer
    assert all(m.weight.dtype == FP8_DTYPE for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.element_size() > 1
                   for name, m in model.named_modules() if "layers." in name)
    # The LM head and embedding stay 16-bit.
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head is not None and model.lm_head.weight.dtype == torch.bfloat16


def _with_quant(tmp_path: Path, quant: dict, name: str = "q") -> Path:
    model_dir = make_tiny_model(tmp_path / name, "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quant
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


_CT_GROUP = {"targets": ["Linear"], "input_activations": None,
             "weights": {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False,
                         "strategy": "channel"}}


@pytest.mark.parametrize("quant,message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme 'weird'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": _CT_GROUP},
      "ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}, "model.layers.0.mlp.down_proj"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": _CT_GROUP},
      "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "channel"}},
     "kv_cache_scheme: 8-bit float, strategy 'channel'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": _CT_GROUP},
      "kv_cache_scheme": {"num_bits": 8, "type": "float", "dynamic": True}},
     "kv_cache_scheme: .*dynamic=True"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        **_CT_GROUP, "weights": {**_CT_GROUP["weights"], "num_bits": 4, "type": "int"}}}},
     "4-bit int"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        **_CT_GROUP, "weights": {**_CT_GROUP["weights"], "strategy": "group",
                                 "group_size": 128}}}}, "strategy 'group'"),
], ids=["gptq", "block", "scheme", "ignore", "kv-cache-channel", "kv-cache-dynamic", "int4",
        "group"])
def test_unsupported_quantization_configs_are_refused_by_name(tmp_path, quant, message):
    model_dir = _with_quant(tmp_path, quant)
    with pytest.raises(RuntimeError, match=f"Unsupported quantization_config: .*{message}"):
        LLM(str(model_dir))


def test_broken_fp8_checkpoints_are_refused_by_tensor(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8")
    # A scale missing: named, not loaded as 1.0.
    (file,) = fp8_dir.glob("*.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, str(file))
    with pytest.raises(RuntimeError, match=r"left unloaded: model\.layers\.1\.self_attn\."
                                           r"k_proj\.weight_scale"):
        LLM(str(fp8_dir))
    # 16-bit weights where the config promises float8.
    unquantized = _with_quant(tmp_path, {"quant_method": "compressed-tensors",
                                         "config_groups": {"g": _CT_GROUP}}, "u")
    with pytest.raises(RuntimeError, match="needs float8_e4m3fn weights, got torch.float32"):
        LLM(str(unquantized))
    with pytest.raises(ValueError, match="quantization must be one of fp8, got 'int4'"):
        LLM("demo", quantization="int4")
