"""vserve's Llama-family model against Hugging Face transformers on the same random weights.

Every variant is loaded through ``load_arch_config`` + ``load_model`` in float32 and its
log-probabilities compared with ``AutoModelForCausalLM`` for a whole prompt, for chunked and
token-by-token continuation through a paged cache with a shuffled block table, and for a flat
batch of sequences in different states. Unused cache blocks hold NaN, so reading a wrong block
shows up as NaN logits.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import make_attn_metadata, make_tiny_model, positions_for
from safetensors.torch import load_file, save_file

from vserve.attention.torch_ref import TorchReferenceBackend
from vserve.models.arch import ModelArchConfig, load_arch_config
from vserve.models.layers import RMSNorm, RotaryEmbedding
from vserve.models.llama import LlamaForCausalLM
from vserve.models.loader import iterate_weights, load_model, resolve_dtype
from vserve.models.registry import SUPPORTED_ARCHITECTURES, get_model_class
from vserve.models.source import resolve_model_dir

BLOCK_SIZE = 4
NUM_BLOCKS = 48
PROMPT_LEN = 20
TOL = 1e-4

VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "llama-tied": {"arch": "llama", "tie_word_embeddings": True},
    "llama-bias": {"arch": "llama", "attention_bias": True, "mlp_bias": True},
    "llama-linear-rope": {"arch": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama-sharded": {"arch": "llama", "num_shards": 3},
    "llama3": {"arch": "llama3"},
    "mistral": {"arch": "mistral"},
    "qwen2": {"arch": "qwen2"},
    "qwen2-tied-sharded": {"arch": "qwen2", "tie_word_embeddings": True, "num_shards": 2},
    "qwen3": {"arch": "qwen3"},
}


def load(model_dir: Path, arch: ModelArchConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    model = load_model(model_dir, arch, dtype, torch.device("cpu"), TorchReferenceBackend())
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    return model


@dataclass
class Loaded:
    arch: ModelArchConfig
    model: LlamaForCausalLM
    prompts: list[list[int]]
    hf_logprobs: list[torch.Tensor]  # per prompt, [len, vocab]


@pytest.fixture(scope="module", params=list(VARIANTS))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    from transformers import AutoModelForCausalLM

    kwargs = dict(VARIANTS[request.param])
    model_dir = make_tiny_model(
        tmp_path_factory.mktemp(request.param), kwargs.pop("arch"), **kwargs
    )
    arch = load_arch_config(model_dir)
    model = load(model_dir, arch, torch.float32)
    rng = random.Random(request.param)
    prompts = [[rng.randrange(arch.vocab_size) for _ in range(n)] for n in (PROMPT_LEN, 11, 5)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf_logprobs = [hf(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]
    return Loaded(arch, model, prompts, hf_logprobs)


def new_caches(
    arch: ModelArchConfig, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (NUM_BLOCKS, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim)
    return [
        (torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
        for _ in range(arch.num_hidden_layers)
    ]


def shuffled_tables(lengths: list[int], seed: int) -> list[list[int]]:
    """Disjoint, non-contiguous, unordered block tables covering ``lengths`` tokens."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for n in lengths:
        need = -(-n // BLOCK_SIZE)
        tables.append(order[:need])
        order = order[need:]
    return tables


def step(
    lm: Loaded,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    chunks: list[tuple[list[int], int]],
    tables: list[list[int]],
) -> list[torch.Tensor]:
    """One flat forward; ``chunks[s] = (all tokens of seq s so far, num_new)``.

    Returns each sequence's log-probabilities for its new rows.
    """
    seqs = [(len(tokens) - new, new) for tokens, new in chunks]
    ids = torch.tensor([t for tokens, new in chunks for t in tokens[len(tokens) - new :]])
    metadata = make_attn_metadata(seqs, tables, BLOCK_SIZE)
    with torch.inference_mode():
        hidden = lm.model(ids, positions_for(seqs), caches, metadata)
        logprobs = lm.model.compute_logits(hidden).log_softmax(-1)
    assert logprobs.dtype == torch.float32
    return list(logprobs.split([new for _, new in chunks]))


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "NaN logits: a poisoned cache block was read"
    return (got - want).abs().max().item()


def test_full_prompt_matches_hf(loaded: Loaded) -> None:
    prompt = loaded.prompts[0]
    tables = shuffled_tables([len(prompt)], seed=1)
    (got,) = step(loaded, new_caches(loaded.arch), [(prompt, len(prompt))], tables)
    assert max_err(got, loaded.hf_logprobs[0]) < TOL


@pytest.mark.parametrize("first,chunk", [(7, 1), (5, 3), (1, 4)])
def test_chunked_continuation_matches_hf(loaded: Loaded, first: int, chunk: int) -> None:
    prompt, want = loaded.prompts[0], loaded.hf_logprobs[0]
    caches = new_caches(loaded.arch)
    tables = shuffled_tables([len(prompt)], seed=first)
    done = 0
    while done < len(prompt):
        new = min(first if done == 0 else chunk, len(prompt) - done)
        (got,) = step(loaded, caches, [(prompt[: done + new], new)], tables)
        assert max_err(got, want[done : done + new]) < TOL, f"tokens {done}..{done + new}"
        done += new


def test_flat_batch_equals_each_alone(loaded: Loaded) -> None:
    prompts, tables = loaded.prompts, shuffled_tables([len(p) for p in loaded.prompts], seed=2)
    batched = step(loaded, new_caches(loaded.arch), [(p, len(p)) for p in prompts], tables)
    for p, table, got, want in zip(prompts, tables, batched, loaded.hf_logprobs, strict=True):
        (alone,) = step(loaded, new_caches(loaded.arch), [(p, len(p))], [table])
        assert max_err(got, alone) < 1e-5
        assert max_err(got, want) < TOL


def test_mixed_prefill_and_decode_batch(loaded: Loaded) -> None:
    """A step holding a fresh prefill, a continued prefill and a decode, as the scheduler
    builds them under continuous batching."""
    long, mid, short = loaded.prompts
    tables = shuffled_tables([len(long), len(mid), len(short)], seed=3)
    caches = new_caches(loaded.arch)
    # Earlier steps: mid's first 6 tokens and long's first 19 are cached.
    step(loaded, caches, [(mid[:6], 6), (long[:19], 19)], tables[1:2] + tables[:1])
    got = step(loaded, caches, [(short, 5), (mid, 5), (long, 1)], [tables[2], tables[1], tables[0]])
    assert max_err(got[0], loaded.hf_logprobs[2]) < TOL
    assert max_err(got[1], loaded.hf_logprobs[1][6:]) < TOL
    assert max_err(got[2], loaded.hf_logprobs[0][19:]) < TOL


# ----------------------------------------------------------------------------- loading


def test_bfloat16_load_keeps_rope_cache_float32(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", "qwen3")
    arch = load_arch_config(model_dir)
    fp32 = load(model_dir, arch, torch.float32)
    bf16 = load(model_dir, arch, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.model.rotary_emb.cos_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # load_model restored it
    prompt = [3, 17, 250, 9, 100, 42, 7, 8]
    outs = []
    for model in (fp32, bf16):
        lm = Loaded(arch, model, [prompt], [])
        caches = new_caches(arch, model.model.embed_tokens.weight.dtype)
        outs.append(step(lm, caches, [(prompt, len(prompt))], [[4, 9]])[0])
    # bf16 keeps ~3 significant digits; a wrong weight or rope would be off by O(1).
    assert max_err(outs[1], outs[0]) < 0.15


def _write_config(directory: Path, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "max_position_embeddings": 256,
    }
    cfg.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_unsupported_architecture_named(tmp_path: Path) -> None:
    _write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'") as err:
        load_arch_config(tmp_path)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        get_model_class("GPT2LMHeadModel")


def test_missing_config_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        load_arch_config(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_shard_named(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", "llama", num_shards=3)
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        list(iterate_weights(model_dir))


def test_no_weights_named(tmp_path: Path) -> None:
    _write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list(iterate_weights(tmp_path))


@pytest.mark.parametrize("tied", [False, True])
def test_missing_and_unexpected_weights_named(tmp_path: Path, tied: bool) -> None:
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", tie_word_embeddings=tied)
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # skipped
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.ones(2, 2)
    save_file(tensors, str(path))
    arch = load_arch_config(model_dir)
    with pytest.raises(ValueError) as err:
        load_model(model_dir, arch, torch.float32, torch.device("cpu"), TorchReferenceBackend())
    message = str(err.value)
    assert "model.layers.1.self_attn.k_proj.bias" in message
    assert "model.layers.0.post_attention_layernorm.weight" in message
    assert "model.layers.7.mlp.up_proj.weight" in message
    assert "inv_freq" not in message
    assert "q_proj" not in message and "v_proj" not in message  # the other shards loaded


def test_tied_checkpoint_with_lm_head_loads(tmp_path: Path) -> None:
    """Some tied checkpoints still store lm_head.weight; it is the embedding, so ignored."""
    model_dir = make_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=True)
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path))
    arch = load_arch_config(model_dir)
    model = load(model_dir, arch, torch.float32)
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_arch_config_old_and_new_spellings(tmp_path: Path) -> None:
    old = load_arch_config(
        _write_config(
            tmp_path / "old",
            rope_theta=5e5,
            rope_scaling={"type": "linear", "factor": 4.0},
            torch_dtype="bfloat16",
            eos_token_id=7,
        )
    )
    new = load_arch_config(
        _write_config(
            tmp_path / "new",
            rope_parameters={"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0},
            dtype="bfloat16",
            eos_token_id=[7, 9],
        )
    )
    for arch in (old, new):
        assert arch.rope_theta == 5e5
        assert arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}
        assert arch.torch_dtype == "bfloat16"
        assert arch.head_dim == 16
        assert arch.kv_cache_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    (tmp_path / "new" / "generation_config.json").write_text('{"eos_token_id": [9, 11]}')
    assert load_arch_config(tmp_path / "new").eos_token_ids == [7, 9, 11]
    default = load_arch_config(
        _write_config(tmp_path / "d", rope_parameters={"rope_type": "default"})
    )
    assert default.rope_scaling is None and default.rope_theta == 10000.0
    assert default.torch_dtype is None


def test_arch_config_family_flags(tmp_path: Path) -> None:
    qwen2 = load_arch_config(
        _write_config(tmp_path / "q2", architectures=["Qwen2ForCausalLM"], sliding_window=64)
    )
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    assert qwen2.sliding_window is None  # use_sliding_window is off
    qwen3 = load_arch_config(
        _write_config(
            tmp_path / "q3",
            architectures=["Qwen3ForCausalLM"],
            head_dim=32,
            use_sliding_window=True,
            sliding_window=64,
        )
    )
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.sliding_window) == (True, 32, 64)
    mistral = load_arch_config(
        _write_config(tmp_path / "m", architectures=["MistralForCausalLM"], sliding_window=64)
    )
    assert mistral.sliding_window == 64 and not mistral.attention_bias


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"hidden_act": "gelu"}, "'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_arch_config_rejections_named(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        load_arch_config(_write_config(tmp_path, **overrides))


def test_resolve_dtype(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    bf16 = load_arch_config(_write_config(tmp_path / "a", dtype="bfloat16"))
    unspecified = load_arch_config(_write_config(tmp_path / "b"))
    assert resolve_dtype(bf16, "auto", cpu) == torch.bfloat16
    assert resolve_dtype(unspecified, "auto", cpu) == torch.float32
    assert resolve_dtype(bf16, "float16", cpu) == torch.float16  # as requested, on CPU too
    assert resolve_dtype(bf16, "float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype(bf16, "int8", cpu)


def test_resolve_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    import huggingface_hub

    calls: list[tuple[str, str | None]] = []

    def offline(repo_id: str, revision: str | None = None, **_: Any) -> str:
        calls.append((repo_id, revision))
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="no-such-org/no-such-model.*offline"):
        resolve_model_dir("no-such-org/no-such-model", revision="v1")
    assert calls == [("no-such-org/no-such-model", "v1")]


def test_rotary_matches_hf() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = torch.tensor([0, 1, 5, 17, 300, 1023, 2047])
    for scaling in (
        None,
        {"rope_type": "linear", "factor": 3.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ):
        params = {"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})}
        config = LlamaConfig(
            hidden_size=128,
            num_attention_heads=4,
            max_position_embeddings=2048,
            rope_parameters=params,
        )
        cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
        rope = RotaryEmbedding(32, 2048, 500000.0, scaling)
        cos, sin = rope.cos_sin(positions)
        assert torch.equal(torch.cat((cos, cos), -1), cos_hf[0]), scaling
        assert torch.equal(torch.cat((sin, sin), -1), sin_hf[0]), scaling
    with pytest.raises(ValueError, match="'yarn'"):
        RotaryEmbedding(32, 64, 1e4, {"rope_type": "yarn", "factor": 2.0})


def test_rmsnorm_fused_residual() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    out, new_residual = norm(x, r)
    assert torch.equal(new_residual, x + r)
    assert torch.equal(out, norm(x + r))
    expected = norm.weight * (x + r) / torch.sqrt(((x + r) ** 2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected)
