"""The GPU engine end to end: Triton kernels, CUDA graphs and memory sizing, against HF.

* float32: greedy tokens identical to transformers' ``generate`` (run on the GPU, float32)
  for 24 new tokens and logprobs within 1e-4, with CUDA graphs (batches padded to the
  graph sizes) and with ``enforce_eager``; alone, in a batch, and through prefix-cache hits
  and chunked prefill.
* bfloat16: the first greedy token equals transformers' bf16 ``generate``, later ones too
  unless HF's own top two are a near-tie (within ``BF16_LOGPROB_TOL``), and the logprobs
  of the top-5 tokens agree within ``BF16_LOGPROB_TOL`` (measured: ~0.03).
* memory sizing: KV blocks come from a profiling pass under ``gpu_memory_utilization``,
  and the whole process stays under that fraction of the card.

The engine core runs in this process (no ZMQ). Skipped without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.engine import greedy_generate
from helpers.models import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NEW_TOKENS = 24
BF16_LOGPROB_TOL = 0.15  # absolute, on log-probabilities of the top-5 tokens


def _engine(model_dir, dtype, **kw):
    from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
    from vserve.engine.core import EngineCore

    cache = {k: kw.pop(k) for k in ("block_size", "num_kv_blocks", "gpu_memory_utilization",
                                    "enable_prefix_caching") if k in kw}
    sched = {k: kw.pop(k) for k in ("max_num_batched_tokens", "max_num_seqs") if k in kw}
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype=dtype,
                          max_model_len=kw.pop("max_model_len", 512)),
        cache=CacheConfig(**cache),
        scheduler=SchedulerConfig(**sched),
        device=DeviceConfig(device="cuda", enforce_eager=kw.pop("enforce_eager", False),
                            mixed_step_graphs=kw.pop("mixed_step_graphs", True)),
    )
    assert not kw, kw
    return EngineCore(config, model_dir)


def _generate(core, prompts, max_tokens=NEW_TOKENS, logprobs=None):
    return greedy_generate(core, prompts, max_tokens, logprobs)


def _hf(model_dir, dtype, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device="cuda"), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, output_scores=True, return_dict_in_generate=True,
            eos_token_id=None, pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1).cpu() for s in out.scores]
    return tokens, logprobs


def _prompts(seed, lengths, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "qwen2"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_float32_greedy_matches_transformers(tmp_path, arch, enforce_eager):
    model_dir = make_tiny_model(tmp_path / arch, arch)
    prompts = _prompts(hash(arch) & 0xFFFF, (1, 7, 16, 19, 33, 64))
    expected = [_hf(model_dir, torch.float32, p, NEW_TOKENS) for p in prompts]
    core = _engine(model_dir, "float32", block_size=4, enforce_eager=enforce_eager,
                   num_kv_blocks=2048)
    assert (core.runner.graphs is None) == enforce_eager
    assert (core.runner.mixed_graphs is None) == enforce_eager
    alone = [_generate(core, [p], logprobs=1) for p in prompts]
    batched, _ = _generate(core, prompts)
    cached, _ = _generate(core, prompts)  # full prompt blocks now come from the prefix cache
    for i, (tokens, ref_lps) in enumerate(expected):
        got, lps = alone[i][0][0], alone[i][1][0]
        assert got == tokens, (arch, i)
        assert batched[i] == tokens, (arch, i)
        assert cached[i] == tokens, (arch, i)
        err = max(abs(lp.logprobs[0][0] - ref[t].item())
                  for lp, ref, t in zip(lps, ref_lps, tokens))
        assert err < 1e-4, (arch, i, err)
    if not enforce_eager:  # the prefill steps replayed graphs of mixed steps
        assert core.runner.mixed_graphs.replays > 0


def test_float32_chunked_prefill_and_big_batch(tmp_path):
    """Prompts prefilled in 16-token chunks next to decoding sequences; then 40 sequences
    decode together (graph of size 40), and 300 (more than the largest graph: eager)."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    prompts = _prompts(11, (50, 90, 13, 17, 5))
    expected = [_hf(model_dir, torch.float32, p, 12)[0] for p in prompts]
    core = _engine(model_dir, "float32", max_num_batched_tokens=16, num_kv_blocks=4096,
                   enable_prefix_caching=False, max_num_seqs=512)
    got, _ = _generate(core, prompts, max_tokens=12)
    assert got == expected
    many = _prompts(12, [random.Random(13 + i).randrange(1, 40) for i in range(300)])
    eager = _engine(model_dir, "float32", num_kv_blocks=8192, enforce_eager=True,
                    max_num_seqs=512)
    for batch in (many[:40], many):
        assert _generate(core, batch, max_tokens=6)[0] == _generate(eager, batch,
                                                                    max_tokens=6)[0]


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-graphs", "eager-prefill"])
def test_bfloat16_first_tokens_and_logprobs_close(tmp_path, arch, mixed):
    """bf16 vs HF bf16 (different kernels, different rounding): along the sequence, from
    the first token on, tokens are equal until a position where HF's own top two are within
    ``BF16_LOGPROB_TOL`` (a near-tie either side may break: the tiny random model's
    distributions are flat), and up to there the top-5 logprobs agree within
    ``BF16_LOGPROB_TOL``. With and without the graphs of mixed steps (the prefill)."""
    model_dir = make_tiny_model(tmp_path / arch, arch, dtype="bfloat16")
    prompts = _prompts(hash(arch) & 0xFF, (9, 30, 70))
    core = _engine(model_dir, "bfloat16", num_kv_blocks=1024, mixed_step_graphs=mixed)
    worst = 0.0
    compared = 0
    for p in prompts:
        ref_tokens, ref_lps = _hf(model_dir, torch.bfloat16, p, 4)
        (tokens,), (lps,) = _generate(core, [p], max_tokens=4, logprobs=5)
        first_gap = ref_lps[0][ref_tokens[0]].item() - ref_lps[0][tokens[0]].item()
        print(f"bf16 {arch} prompt of {len(p)}: first tokens {tokens[0]} / HF {ref_tokens[0]}, "
              f"HF logprob gap {first_gap:.4f}")
        for tok, ref_tok, lp, ref in zip(tokens, ref_tokens, lps, ref_lps):
            for t, val in zip(lp.token_ids[0][1:], lp.logprobs[0][1:]):
                worst = max(worst, abs(val - ref[t].item()))
            compared += 1
            if tok != ref_tok:
                gap = ref[ref_tok].item() - ref[tok].item()
                assert gap < BF16_LOGPROB_TOL, (arch, p, tokens, ref_tokens, gap)
                break
    assert worst < BF16_LOGPROB_TOL, worst
    assert compared >= 6
    print(f"bf16 {arch}: max |logprob - HF| over top-5 = {worst:.4f} ({compared} positions)")


def test_memory_sizing_respects_utilization(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama", max_position_embeddings=4096)
    util = 0.3
    torch.cuda.empty_cache()
    core = _engine(model_dir, "bfloat16", gpu_memory_utilization=util, max_model_len=4096)
    free, total = torch.cuda.mem_get_info()
    usable = core.num_kv_blocks - 1
    kv_bytes = usable * core.runner.bytes_per_block()
    assert kv_bytes > 0
    assert total - free <= util * total + (256 << 20), (total - free) / total
    assert core.max_concurrency == pytest.approx(usable * 16 / 4096)
    # And it still generates.
    assert len(_generate(core, _prompts(1, (10,)), max_tokens=3)[0][0]) == 3


def test_pdl_launches_match_plain_ones(tmp_path, monkeypatch):
    """Programmatic dependent launch changes when the decode kernels start, never what they
    compute: tokens and logprobs are bitwise equal with ``VSERVE_PDL=0``. The GEMV and the
    fused norm + GEMV are forced (K tiles of 64: the down projection loops), so that every
    PDL kernel of the step runs; a kernel reading its input before the previous kernel
    finished would show here as a difference."""
    from vserve import ops
    from vserve.ops import linear as lin

    if not ops.pdl():
        pytest.skip("PDL needs a Hopper (sm90+) GPU")
    monkeypatch.setattr(lin, "_CHOICE", {})
    monkeypatch.setattr(lin, "_NORM_CHOICE", {})
    monkeypatch.setattr(lin, "choose_gemv", lambda *a, **k: (4, 64, 4))
    monkeypatch.setattr(lin, "_choose_norm", lambda *a: (4, 64, 4))
    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype="bfloat16")
    prompts = _prompts(21, (5, 17, 40))
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("VSERVE_PDL", flag)
        ops.pdl.cache_clear()
        assert ops.pdl() == (flag == "1")
        core = _engine(model_dir, "bfloat16", num_kv_blocks=1024)
        greedy = [_generate(core, [p], max_tokens=20)[0][0] for p in prompts]
        batched = _generate(core, prompts, max_tokens=20)[0]
        lps = _generate(core, prompts[:1], max_tokens=6, logprobs=3)[1][0]
        results.append((greedy, batched, [(x.token_ids, x.logprobs) for x in lps]))
        del core
    ops.pdl.cache_clear()
    used = lin.choices()
    assert any(v.startswith("fused") for v in used.values()), used
    assert any(v.startswith("gemv") for v in used.values()), used
    assert results[0] == results[1]


def test_mixed_step_graphs_match_eager_under_churn(tmp_path):
    """Requests arrive at every step while others decode and finish (prompt chunks next to
    decode rows, chunked prefill, async scheduling chaining steps across arrivals): the
    graphs of mixed steps give the tokens of the eager forward and logprobs within 1e-4
    (float32; cuBLAS may pick another algorithm for the padded row count)."""
    dtype = "float32"
    import time

    from vserve.protocol.requests import EngineCoreRequest
    from vserve.protocol.sampling import SamplingParams

    model_dir = make_tiny_model(tmp_path / "m", "llama", dtype=dtype)
    rng = random.Random(31)
    prompts = _prompts(32, [rng.randrange(1, 150) for _ in range(40)])
    budgets = [rng.randrange(2, 20) for _ in prompts]

    def run(mixed: bool):
        core = _engine(model_dir, dtype, num_kv_blocks=4096, max_num_batched_tokens=256,
                       max_num_seqs=64, mixed_step_graphs=mixed)
        assert (core.runner.mixed_graphs is not None) == mixed
        tokens: dict[str, list[int]] = {}
        lps: dict[str, list] = {}
        pending = list(range(len(prompts)))
        while pending or core.has_unfinished_requests():
            for _ in range(2):  # two arrivals per step
                if pending:
                    i = pending.pop(0)
                    params = SamplingParams(temperature=0, max_tokens=budgets[i],
                                            ignore_eos=True, logprobs=2 if i % 3 == 0 else None)
                    core.add_request(EngineCoreRequest(f"r{i}", prompts[i], params, [],
                                                       time.time()))
            for outs in core.step().values():
                for o in outs.unpack():
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.new_logprobs is not None:
                        lps.setdefault(o.request_id, []).append(o.new_logprobs)
        return core, tokens, lps

    core, tokens, lps = run(True)
    replays = core.runner.mixed_graphs.replays
    assert replays > 10, replays
    _, ref_tokens, ref_lps = run(False)
    assert tokens == ref_tokens
    assert all(len(tokens[f"r{i}"]) == budgets[i] for i in range(len(prompts)))
    for rid, ref in ref_lps.items():
        for a, b in zip(lps[rid], ref, strict=True):
            assert a.token_ids == b.token_ids, rid
            for x, y in zip(a.logprobs[0], b.logprobs[0]):
                assert abs(x - y) <= 1e-4, (rid, x, y)
