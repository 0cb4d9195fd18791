"""Tiny random-weight Hugging Face checkpoints and attention metadata, for tests.

``make_tiny_model`` writes a real HF model directory with transformers (so the files are
exactly what ``save_pretrained`` produces), with every parameter randomized — norm weights
around 1 and non-zero biases included — so that a mis-mapped weight changes the logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vserve.attention.backend import AttentionMetadata

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def _demo_module() -> Any:
    try:
        import vserve.models.demo as demo
    except ImportError:
        return None
    return demo


def special_token_ids() -> tuple[int, list[int]]:
    """``(bos, eos_ids)`` of the tiny models: the demo tokenizer's when it exists.

    The tokenizer written next to the weights must agree with the config about which ids
    are BOS/EOS, or an engine stopping on the config's EOS would stop on an ordinary byte.
    """
    demo = _demo_module()
    if demo is not None and hasattr(demo, "BOS_TOKEN_ID") and hasattr(demo, "EOS_TOKEN_ID"):
        eos = [int(demo.EOS_TOKEN_ID)]
        if hasattr(demo, "EOT_TOKEN_ID"):
            eos.append(int(demo.EOT_TOKEN_ID))
        return int(demo.BOS_TOKEN_ID), eos
    return 1, [2]


def _config(arch: str, **kwargs: Any) -> Any:
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**kwargs)
    if arch == "llama3":
        # A short pretraining length so that the llama3 rescaling changes most frequencies.
        kwargs.setdefault(
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        kwargs.setdefault("rope_theta", 500000.0)
        return transformers.LlamaConfig(**kwargs)
    if arch == "mistral":
        return transformers.MistralConfig(**kwargs)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    if arch == "qwen3":
        kwargs.setdefault("head_dim", 32)  # differs from hidden / heads = 16 on purpose
        return transformers.Qwen3Config(**kwargs)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS)}")


def _shard(directory: Path, num_shards: int) -> None:
    """Split ``model.safetensors`` into ``num_shards`` files plus the HF index json."""
    single = directory / "model.safetensors"
    tensors = load_file(str(single))
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::num_shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    single.unlink()


def make_tiny_model(
    directory: Path,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    vocab_size: int = 320,
    max_position_embeddings: int = 2048,
    extra_eos_token_ids: tuple[int, ...] = (),
    **config_overrides: Any,
) -> Path:
    """Write a tiny random HF checkpoint of ``arch`` into ``directory`` and return it.

    Hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128. BOS/EOS ids are
    :func:`special_token_ids`; ``config.json`` names the first EOS, ``generation_config.json``
    all of them plus ``extra_eos_token_ids``. A tokenizer is added when ``vserve.models.demo``
    provides ``write_demo_tokenizer``.
    """
    import transformers

    bos, eos = special_token_ids()
    if max(bos, *eos) >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} cannot hold BOS {bos} / EOS {eos}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.15,  # spread logits: greedy ties would make tests flaky
        "rms_norm_eps": 1e-6,
        "bos_token_id": bos,
        "eos_token_id": eos[0],
    }
    kwargs.update(config_overrides)
    config = _config(arch, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory, safe_serialization=True)
    if num_shards > 1:
        _shard(directory, num_shards)
    generation = {"bos_token_id": bos, "eos_token_id": [*eos, *extra_eos_token_ids]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer = getattr(_demo_module(), "write_demo_tokenizer", None)
    if write_tokenizer is not None:
        write_tokenizer(directory)
    return directory


def make_attn_metadata(
    seqs: list[tuple[int, int]],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a flat batch; ``seqs[s] = (context_len_before, new_len)``.

    The new tokens of sequence ``s`` are its positions ``ctx .. ctx + new - 1`` and go to
    slots ``block_tables[s][p // block_size] * block_size + p % block_size``.
    """
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    for (ctx, new), table in zip(seqs, block_tables, strict=True):
        total = ctx + new
        if len(table) * block_size < total:
            raise ValueError(f"block table {table} too short for {total} tokens")
        slots.extend(
            table[p // block_size] * block_size + p % block_size for p in range(ctx, total)
        )
        starts.append(starts[-1] + new)
        seq_lens.append(total)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )


def positions_for(seqs: list[tuple[int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """The flat ``positions`` tensor matching ``make_attn_metadata(seqs, ...)``."""
    pos = [p for ctx, new in seqs for p in range(ctx, ctx + new)]
    return torch.tensor(pos, dtype=torch.int64, device=device)


def hf_greedy(model_dir, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_scores=True, return_dict_in_generate=True, eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [
        torch.log_softmax(score[0].float(), -1)[tok].item()
        for score, tok in zip(out.scores, tokens)
    ]
    return tokens, logprobs


def random_prompt(rng: random.Random, n: int, vocab: int = 300) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_fp8_checkpoint(src: Path, dst: Path, *, method: str = "compressed-tensors",
                         strategy: str = "channel", activations: str | None = "dynamic",
                         kv_scales: list[tuple[float, float]] | None = None,
                         kv_scale_names: str = "attn") -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with its decoder linear weights stored as
    float8 e4m3 and their scales, in the format Hugging Face FP8 models ship:
    ``compressed-tensors`` (``strategy`` channel or tensor; ``activations`` dynamic per
    token, static per tensor — an ``input_scale`` per layer — or None, weight-only) or
    quant_method ``fp8`` (per-tensor, ``activations`` dynamic or static). ``kv_scales``
    (compressed-tensors): layer i's ``(k_scale, v_scale)`` and a ``kv_cache_scheme``, named
    ``self_attn.k_scale`` (``kv_scale_names="attn"``) or ``k_proj.output_scale``
    (``"proj"``, older llm-compressor files)."""
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    tensors = {}
    files = sorted(src.glob("*.safetensors"))
    assert len(files) == 1, "one safetensors file"
    gen = torch.Generator().manual_seed(1)
    per_tensor = method == "fp8" or strategy == "tensor"
    for name, t in load_file(files[0]).items():
        if name.endswith(".weight") and any(f".{n}." in name for n in _LINEAR_NAMES):
            w = t.float()
            amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1)
            scale = (amax / 448.0).clamp(min=1e-12)
            w8 = (w / (scale if per_tensor else scale[:, None])).clamp(-448, 448)
            tensors[name] = w8.to(torch.float8_e4m3fn)
            base = name[: -len("weight")]
            tensors[base + "weight_scale"] = scale.reshape(()) if method == "fp8" else (
                scale.reshape(1) if per_tensor else scale.reshape(-1, 1))
            if activations == "static":
                tensors[base + "input_scale"] = torch.tensor(
                    [0.01 + 0.02 * torch.rand((), generator=gen).item()])
        else:
            tensors[name] = t
    for i, (ks, vs) in enumerate(kv_scales or []):
        for which, value in (("k", ks), ("v", vs)):
            suffix = f"{which}_scale" if kv_scale_names == "attn" else f"{which}_proj.output_scale"
            tensors[f"model.layers.{i}.self_attn.{suffix}"] = torch.tensor([value])
    save_file(tensors, str(dst / files[0].name), metadata={"format": "pt"})  # over the copy
    config = json.loads((dst / "config.json").read_text())
    if method == "fp8":
        quant: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": activations}
    else:
        act = None if activations is None else {
            "type": "float", "num_bits": 8, "symmetric": True,
            "dynamic": activations == "dynamic",
            "strategy": "token" if activations == "dynamic" else "tensor"}
        quant = {"quant_method": "compressed-tensors", "format": "float-quantized",
                 "ignore": ["lm_head"],
                 "kv_cache_scheme": {"type": "float", "num_bits": 8, "symmetric": True,
                                     "dynamic": False, "strategy": "tensor"}
                 if kv_scales else None,
                 "config_groups": {"group_0": {
                     "targets": ["Linear"], "input_activations": act,
                     "output_activations": None,
                     "weights": {"type": "float", "num_bits": 8, "symmetric": True,
                                 "dynamic": False, "strategy": strategy}}}}
    config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_dequantized(fp8_dir: Path, dst: Path) -> Path:
    """A float32 copy of the FP8 checkpoint ``fp8_dir`` with every weight dequantized
    (``w8 * scale``) and no quantization_config: what transformers runs as the oracle of an
    FP8 model (it decompresses such checkpoints the same way)."""
    import shutil

    fp8_dir, dst = Path(fp8_dir), Path(dst)
    shutil.copytree(fp8_dir, dst)
    (file,) = sorted(dst.glob("*.safetensors"))
    loaded = load_file(file)
    out = {}
    for name, t in loaded.items():
        if name.endswith(("_scale",)):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = loaded[name[: -len("weight")] + "weight_scale"].float()
            scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
            out[name] = t.float() * scale
        else:
            out[name] = t.float()
    save_file(out, str(file), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
