"""FP8 on the GPU: the kernels against torch references on fresh random inputs (a new seed
every run, printed on failure; odd sizes), and the engine against transformers on the
dequantized weights.

* per-row activation quantization: scales equal to torch's, values within one float8 step;
* the float8 GEMV (every tiling) and the row-wise ``_scaled_mm`` path: within bf16 rounding
  of the same arithmetic done in float32;
* the engine: a weight-only FP8 checkpoint (the GPU multiplies dequantized weights with bf16
  activations) gives transformers' bf16 greedy tokens on those weights; with activations
  quantized per token (``--quantization fp8``), the first greedy token and the logprobs stay
  within ``FP8_ACT_TOL``. Skipped without a GPU of compute capability 8.9+.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.engine import greedy_generate
from helpers.models import make_tiny_model, write_dequantized, write_fp8_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with float8 (sm89+)"),
]

FP8_ACT_TOL = 0.3  # logprobs, activations quantized per token vs not (tiny random model)


@pytest.fixture
def seed() -> int:
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def _ref_quant(x: torch.Tensor, static: torch.Tensor | None = None):
    xf = x.float()
    scale = (static.reshape(1, 1).expand(x.shape[0], 1) if static is not None
             else (xf.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12))
    return (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    g, u = x.chunk(2, dim=-1)
    a = (g.float() / (1 + torch.exp(-g.float()))).to(x.dtype)
    return (a.float() * u.float()).to(x.dtype)


@pytest.mark.parametrize("m,k", [(1, 16), (3, 1000), (17, 4096), (128, 2048), (5, 14336)])
@pytest.mark.parametrize("mode", ["dynamic", "static", "act"])
def test_quantize_rows_matches_torch(seed, m, k, mode):
    from vserve.ops.fp8 import quantize_rows

    width = 2 * k if mode == "act" else k
    x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16) * 3
    static = torch.tensor([0.02], device="cuda") if mode == "static" else None
    q, s = quantize_rows(x, static, act=mode == "act")
    rq, rs = _ref_quant(_silu_mul(x) if mode == "act" else x, static)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0, msg=f"seed {seed}")
    diff = (q.float() - rq.float()).abs()
    step = rq.float().abs().clamp(min=2**-6) * 2**-3  # one float8 e4m3 step
    assert bool((diff <= step).all()), f"seed {seed}"
    assert (diff > 0).float().mean().item() < 1e-3, f"seed {seed}"


@pytest.mark.parametrize("n,k", [(16, 16), (48, 1000), (4096, 2048), (3072, 4096), (1000, 8192)])
@pytest.mark.parametrize("act", [False, True])
def test_fp8_gemv_every_tiling_matches_float32(seed, n, k, act):
    from vserve.models.fp8 import dequantize, quantize_per_channel
    from vserve.ops import linear as lin

    w8, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    x = torch.randn(1, 2 * k if act else k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xin = _silu_mul(x) if act else x
    ref = xin.float() @ dequantize(w8, scale, torch.float32).t() + bias.float()
    for cfg in lin._configs(k):
        got = lin.gemv(x, w8, bias, act, cfg, scale=scale)
        torch.testing.assert_close(got.float(), ref.to(torch.bfloat16).float(), rtol=2e-2,
                                   atol=2e-2 * ref.abs().max().item(),
                                   msg=f"seed {seed} config {cfg}")


@pytest.mark.parametrize("n,k", [(48, 1000), (3072, 2048), (28672, 4096)])
@pytest.mark.parametrize("residual", [False, True])
def test_fp8_norm_gemv_every_tiling_matches_float32(seed, n, k, residual):
    from vserve.models.fp8 import dequantize, quantize_per_channel
    from vserve.ops import linear as lin

    w8, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) if residual else None
    g = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    h = (x.float() + r.float()).to(torch.bfloat16) if residual else x
    normed = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5))
    normed = (g.float() * normed.to(torch.bfloat16).float()).to(torch.bfloat16)
    ref = normed.float() @ dequantize(w8, scale, torch.float32).t()
    for cfg in lin._NORM_CANDIDATES:
        if cfg[1] > 2 * k:
            continue
        got, r_out = lin.norm_gemv(x, r, g, 1e-5, w8, None, cfg, scale)
        torch.testing.assert_close(got.float(), ref.to(torch.bfloat16).float(), rtol=2e-2,
                                   atol=2e-2 * ref.abs().max().item(),
                                   msg=f"seed {seed} config {cfg}")
        torch.testing.assert_close(r_out, h)


@pytest.mark.parametrize("m", [1, 2, 16, 33, 256, 1000])
@pytest.mark.parametrize("n,k", [(256, 512), (4096, 1024), (1024, 14336)])
def test_scaled_mm_matches_the_same_arithmetic_in_float32(seed, m, n, k):
    from vserve.models.fp8 import dequantize, quantize_per_channel
    from vserve.ops.fp8 import scaled_mm

    w8, scale = quantize_per_channel(torch.randn(n, k, device="cuda") * 0.05)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    got = scaled_mm(x, w8, scale, bias, False, None).float()
    xq, xs = _ref_quant(x)
    ref = (xq.float() * xs) @ dequantize(w8, scale, torch.float32).t() + bias.float()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"seed {seed}: relative error {err}"
    # And against unquantized activations: float8's own error, a few percent.
    exact = x.float() @ dequantize(w8, scale, torch.float32).t() + bias.float()
    assert ((got - exact).norm() / exact.norm()).item() < 0.06, f"seed {seed}"


def _engine(model_dir, **model_kw):
    from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
    from vserve.engine.core import EngineCore

    config = EngineConfig(model=ModelConfig(model=str(model_dir), dtype="bfloat16",
                                            max_model_len=512, **model_kw),
                          cache=CacheConfig(num_kv_blocks=1024),
                          device=DeviceConfig(device="cuda"))
    return EngineCore(config, model_dir)


def _hf(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [
        torch.log_softmax(s[0].float(), -1).cpu() for s in out.scores]


def test_weight_only_fp8_engine_matches_transformers_on_dequantized_weights(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8", activations=None)
    reference = write_dequantized(fp8_dir, tmp_path / "ref")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (1, 9, 33)]
    core = _engine(fp8_dir)
    got, lps = greedy_generate(core, prompts, 8, logprobs=5)
    for prompt, tokens, rows in zip(prompts, got, lps):
        want, ref = _hf(reference, prompt, 8)
        assert tokens[0] == want[0]
        err = max(abs(lp - ref[0][t].item()) for t, lp in zip(rows[0].token_ids[0],
                                                                rows[0].logprobs[0]))
        assert err < 0.15, err


def test_fp8_engine_with_quantized_activations_stays_close(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (1, 9, 33, 70)]
    weight_only = _engine(write_fp8_checkpoint(model_dir, tmp_path / "w", activations=None))
    base_tokens, base_lps = greedy_generate(weight_only, prompts, 6, logprobs=5)
    del weight_only
    core = _engine(model_dir, quantization="fp8")
    tokens, lps = greedy_generate(core, prompts, 6, logprobs=5)
    for a, b, la, lb in zip(base_tokens, tokens, base_lps, lps):
        assert a[0] == b[0]
        ta = dict(zip(la[0].token_ids[0], la[0].logprobs[0]))
        diffs = [abs(lp - ta[t]) for t, lp in zip(lb[0].token_ids[0], lb[0].logprobs[0])
                 if t in ta]
        assert diffs and max(diffs) < FP8_ACT_TOL, diffs
