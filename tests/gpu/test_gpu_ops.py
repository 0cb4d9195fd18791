"""The GEMV (with its fused SiLU-and-multiply input), the two-stage argmax and the Gumbel
argmax, on the GPU.

Fresh random inputs each run (seed in failure messages); outputs are NaN-poisoned through
the caching allocator before each call, so an unwritten element fails. Skipped without CUDA
(or run under ``TRITON_INTERPRET=1 VSERVE_TRITON_ON_CPU=1`` without one).
"""

from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = (os.environ.get("TRITON_INTERPRET") == "1"
              and os.environ.get("VSERVE_TRITON_ON_CPU") == "1")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not _INTERPRET,
                       reason="needs CUDA (or the Triton interpreter)"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _poison() -> None:
    """Leave NaN-filled blocks in the caching allocator for the next allocations."""
    if DEVICE == "cuda":
        junk = [torch.full((1 << n,), float("nan"), device=DEVICE) for n in range(8, 22)]
        del junk



SHAPES = [(320, 64), (100, 96), (3072, 2048), (2048, 2048), (2048, 8192), (16384, 2048),
          (1000, 1000)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_linear(n, k, dtype, fresh_seed: int):
    from vserve.ops.linear import _configs, gemv

    if _INTERPRET and (dtype == torch.bfloat16 or n * k > 300_000):
        pytest.skip("slow or unsupported under the interpreter")
    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    x2 = torch.randn(1, 2 * k, generator=g).to(dtype).to(DEVICE)
    gate, up = x2.float().chunk(2, dim=-1)
    act_in = (torch.nn.functional.silu(gate.to(dtype)) * up.to(dtype))
    for cfg in _configs(k):
        for bias in (None, b):
            for act in (False, True):
                inp = act_in if act else x
                ref = torch.nn.functional.linear(inp.float(), w.float(),
                                                 None if bias is None else bias.float())
                _poison()
                got = gemv(x2 if act else x, w, bias, act, cfg).float()
                assert not got.isnan().any(), (seed, cfg)
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (seed, cfg, bias is not None, act, err)


def test_linear_dispatch_picks_and_matches(fresh_seed: int):
    if DEVICE != "cuda":
        pytest.skip("the dispatch times kernels with CUDA events")
    from vserve.ops.linear import choices, linear

    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(2048, 8192, generator=g) * 0.02).to(torch.bfloat16).cuda()
    x = torch.randn(1, 16384, generator=g).to(torch.bfloat16).cuda()
    ref = torch.nn.functional.linear(
        (torch.nn.functional.silu(x[:, :8192]) * x[:, 8192:]).float(), w.float())
    got = linear(x, w, None, act=True).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2, seed
    assert "(2048, 8192) +act" in choices()
    # More than one row: cuBLAS, same function.
    xs = torch.randn(3, 8192, generator=g).to(torch.bfloat16).cuda()
    assert torch.allclose(linear(xs, w).float(), torch.nn.functional.linear(xs, w).float())


@pytest.mark.parametrize("n,k", [(320, 64), (100, 96), (3072, 2048), (16384, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_gemv_matches_norm_then_linear(n, k, dtype, fresh_seed: int):
    """RMSNorm (+ residual add) fused into the GEMV's input, every tiling: the product
    matches norm-then-linear, program 0 stores the exact residual sum, inputs untouched."""
    from vserve.ops.linear import _NORM_CANDIDATES, norm_gemv

    if _INTERPRET and (dtype == torch.bfloat16 or n * k > 300_000):
        pytest.skip("slow or unsupported under the interpreter")
    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    gamma = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    x0, r0 = x.clone(), r.clone()
    eps = 1e-5
    for res in (None, r):
        h = x if res is None else (x.float() + res.float()).to(dtype)
        hf = h.float()
        normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        y = (gamma.float() * normed.float()).to(dtype)
        for cfg in _NORM_CANDIDATES:
            if cfg[1] > max(16, 1 << (k - 1).bit_length()):
                continue
            for bias in (None, b):
                ref = torch.nn.functional.linear(y.float(), w.float(),
                                                 None if bias is None else bias.float())
                _poison()
                got, r_out = norm_gemv(x, res, gamma, eps, w, bias, cfg)
                got = got.float()
                assert not got.isnan().any(), (seed, cfg)
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (seed, cfg, res is not None, bias is not None, err)
                assert torch.equal(r_out, h), (seed, cfg)
        assert torch.equal(x, x0) and torch.equal(r, r0), seed


def test_norm_linear_and_float32_out_dispatch(fresh_seed: int):
    if DEVICE != "cuda":
        pytest.skip("the dispatch times kernels with CUDA events")
    from vserve.ops.layernorm import fused_add_rms_norm
    from vserve.ops.linear import choices, linear, norm_linear

    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(3072, 2048, generator=g) * 0.02).to(torch.bfloat16).cuda()
    gamma = (1 + 0.1 * torch.randn(2048, generator=g)).to(torch.bfloat16).cuda()
    x = torch.randn(1, 2048, generator=g).to(torch.bfloat16).cuda()
    r = torch.randn(1, 2048, generator=g).to(torch.bfloat16).cuda()
    got = norm_linear(x, r, gamma, 1e-5, w)
    assert "(3072, 2048) +norm +res" in choices()
    h, r_sum = fused_add_rms_norm(x.clone(), r.clone(), gamma, 1e-5)
    ref = linear(h, w).float()
    if got is not None:  # the fused kernel was measured faster
        assert torch.equal(got[1], r_sum), seed
        assert ((got[0].float() - ref).norm() / ref.norm()).item() < 1e-2, seed
    # A float32 output buffer holds the bf16 product exactly (the graphs' logits).
    out = torch.full((1, 3072), float("nan"), device="cuda")
    assert linear(h, w, out=out) is out
    assert torch.equal(out, linear(h, w).float()), seed


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 320), (37, 50000), (256, 128256)])
def test_argmax_matches_torch(rows, vocab, fresh_seed: int):
    from vserve.ops.sampling import argmax

    if _INTERPRET and rows * vocab > 200_000:
        pytest.skip("slow under the interpreter")
    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g)
    # Ties: the first occurrence wins, across block boundaries too.
    x[0, 5] = x[0, vocab - 1] = x[0].max() + 1
    if rows > 1:
        x[1, vocab // 2] = x[1, vocab // 2 + 1] = 1e4
    xd = x.to(DEVICE)
    _poison()
    got = argmax(xd).cpu()
    assert torch.equal(got, x.argmax(-1)), seed
    # The logits buffer of the CUDA graphs is a row slice of a wider one.
    wide = torch.randn(rows + 2, vocab, generator=g).to(DEVICE)
    assert torch.equal(argmax(wide[:rows]).cpu(), wide[:rows].argmax(-1).cpu()), seed


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (5, 320), (64, 50001), (256, 128256)])
def test_gumbel_argmax_matches_the_reference(rows, vocab, fresh_seed: int):
    """The kernel's noise is the reference's integers; only the float32 logarithms may round
    differently, so its pick must score within rounding of the reference's best."""
    from vserve.ops.sampling import gumbel_argmax
    from vserve.worker.gumbel import gumbel_noise

    if _INTERPRET and rows * vocab > 200_000:
        pytest.skip("slow under the interpreter")
    seed = fresh_seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    x[0, : vocab // 3] = float("-inf")  # a grammar mask
    temps = torch.rand(rows, generator=g) * 1.5 + 0.2
    temps[rows // 2] = 0.0  # greedy
    keys = torch.randint(-(1 << 62), 1 << 62, (rows,), generator=g, dtype=torch.int64)
    _poison()
    got = gumbel_argmax(x.to(DEVICE), temps.to(DEVICE), keys.to(DEVICE)).cpu()
    noisy = (temps > 0).unsqueeze(1)
    scores = torch.where(noisy, x / torch.where(noisy, temps.unsqueeze(1), 1.0)
                         + gumbel_noise(keys, vocab), x)
    best = scores.max(dim=-1).values
    picked = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    assert torch.all(picked >= best - 1e-4 * best.abs().clamp(min=1)), seed
    assert got[rows // 2] == x[rows // 2].argmax(), seed
    assert got[0] >= vocab // 3, seed
    # The CUDA path through the sampler's entry point is the kernel.
    from vserve.worker.gumbel import gumbel_argmax as entry

    assert torch.equal(entry(x.to(DEVICE), temps.to(DEVICE), keys.to(DEVICE)).cpu(), got), seed
    # Grammar bitmasks for every other row (one allowing a single token), read in the kernel.
    width = (vocab + 31) // 32
    masked = list(range(0, rows, 2))
    words = torch.randint(-(1 << 31), 1 << 31, (len(masked), width), generator=g,
                          dtype=torch.int64).to(torch.int32)
    words[0] = 0
    bit = 1 << ((vocab - 1) % 32)
    words[0, (vocab - 1) // 32] = bit - (1 << 32) if bit >> 31 else bit  # as int32
    mask_row = torch.full((rows,), -1, dtype=torch.int32)
    mask_row[masked] = torch.arange(len(masked), dtype=torch.int32)
    got = gumbel_argmax(x.to(DEVICE), temps.to(DEVICE), keys.to(DEVICE),
                        (words.to(DEVICE), mask_row.to(DEVICE))).cpu()
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = torch.ones(rows, vocab, dtype=torch.bool)
    allowed[masked] = bits.view(len(masked), -1)[:, :vocab] == 1
    scores = scores.masked_fill(~allowed, float("-inf"))
    assert got[0] == vocab - 1, seed
    assert bool(allowed.gather(1, got.unsqueeze(1)).all()), seed
    best = scores.max(dim=-1).values
    picked = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    assert torch.all(picked >= best - 1e-4 * best.abs().clamp(min=1)), seed
    ref = entry(x, temps, keys, (words, mask_row))  # the CPU path, same noise
    assert torch.equal(scores.gather(1, ref.unsqueeze(1)).squeeze(1), best), seed
