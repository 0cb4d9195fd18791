"""The model architecture, parsed from a Hugging Face model directory with plain ``json``.

Deliberately independent of ``transformers``: the config keys moved between transformers
versions (``rope_theta`` + ``rope_scaling`` became ``rope_parameters`` in v5, ``torch_dtype``
became ``dtype``), and parsing both spellings here means the engine reads any checkpoint the
same way whichever transformers version is installed, or none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vserve.models.quant_config import Fp8Scheme, checkpoint_quantization
from vserve.models.registry import SUPPORTED_ARCHITECTURES, unsupported_architecture_message

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
_DEFAULT_ROPE_THETA = 10000.0

RopeScaling = dict[str, Any]


@dataclass(frozen=True)
class ModelArchConfig:
    """Everything the model code needs about a checkpoint's architecture.

    Invariants (checked by :func:`load_arch_config`): ``architecture`` is one of
    ``SUPPORTED_ARCHITECTURES``; ``num_attention_heads % num_key_value_heads == 0``;
    ``rope_scaling`` is ``None`` (plain RoPE) or a dict whose ``rope_type`` is ``linear`` (with
    ``factor``) or ``llama3`` (with ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``); the activation is SiLU.

    ``sliding_window`` is reported, not applied: the attention backends attend over the whole
    context, so the engine must keep ``max_model_len <= sliding_window`` for exact results.
    """

    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool  # bias on the attention output projection
    mlp_bias: bool  # bias on gate/up/down projections (Llama's ``mlp_bias``)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None
    torch_dtype: str | None  # None when the checkpoint does not say
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    #: The checkpoint's FP8 scheme (``vserve.models.quant_config``); None for 16-bit weights.
    quantization: Fp8Scheme | None = None

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cache one token occupies over all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _token_ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"token id must be an int or a list of ints, got {value!r}")


def _parse_rope(
    cfg: dict[str, Any], max_position_embeddings: int
) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either the v4 or the v5 spelling of the config."""
    merged: dict[str, Any] = {}
    # v4: rope_theta at top level, scaling in rope_scaling (with "type" in old checkpoints);
    # v5: everything in rope_parameters. A v5 config may carry both; rope_parameters wins.
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict):
            merged.update(value)
    if any(isinstance(v, dict) for v in merged.values()):
        raise ValueError("Per-layer-type rope_parameters are not supported")
    theta = merged.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULT_ROPE_THETA
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    partial = merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope_type {rope_type!r}; vserve supports: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling: RopeScaling = {"rope_type": rope_type, **merged}
    required: tuple[str, ...] = ("factor",)
    if rope_type == "llama3":
        # Same fallback as transformers: the pretraining length defaults to the model's.
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
        required = _LLAMA3_ROPE_KEYS
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)} in the config")
    return float(theta), scaling


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{path} lacks {key!r}")
    return cfg[key]


def load_arch_config(model_dir: Path) -> ModelArchConfig:
    """Parse ``config.json`` (and ``generation_config.json`` when present) in ``model_dir``.

    Raises ``FileNotFoundError`` naming a missing ``config.json`` and ``ValueError`` naming an
    unsupported architecture, activation, RoPE type or quantization.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {model_dir}")
    cfg = _read_json(config_path)
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}

    architectures = cfg.get("architectures") or []
    if not architectures:
        raise ValueError(
            f"{config_path} names no architecture; vserve supports: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    architecture = str(architectures[0])
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(unsupported_architecture_message(architecture))
    model_type = str(cfg.get("model_type", ""))
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    is_qwen3 = architecture == "Qwen3ForCausalLM"

    hidden_act = str(cfg.get("hidden_act", "silu"))
    if hidden_act != "silu":
        raise ValueError(f"Unsupported hidden_act {hidden_act!r}; vserve supports: silu")

    hidden_size = int(_require(cfg, "hidden_size", config_path))
    num_heads = int(_require(cfg, "num_attention_heads", config_path))
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    rope_theta, rope_scaling = _parse_rope(cfg, max_pos)

    attention_bias = bool(cfg.get("attention_bias", False))
    if is_qwen2:
        # Qwen2 hard-codes bias on q/k/v (its config has no such key) and none on o_proj.
        qkv_bias, o_bias = True, False
    elif architecture == "MistralForCausalLM":
        qkv_bias, o_bias = False, False
    else:
        qkv_bias, o_bias = attention_bias, attention_bias

    sliding_window: int | None = cfg.get("sliding_window")
    if is_qwen2 or is_qwen3:
        # Qwen configs carry a window they only use when use_sliding_window is set.
        sliding_window = sliding_window if cfg.get("use_sliding_window") else None
    elif architecture == "LlamaForCausalLM":
        sliding_window = None

    eos: list[int] = []
    for tid in _token_ids(cfg.get("eos_token_id")) + _token_ids(gen.get("eos_token_id")):
        if tid not in eos:
            eos.append(tid)
    bos = cfg.get("bos_token_id")
    if bos is None:
        bos = gen.get("bos_token_id")

    return ModelArchConfig(
        architecture=architecture,
        model_type=model_type,
        hidden_size=hidden_size,
        intermediate_size=int(_require(cfg, "intermediate_size", config_path)),
        num_hidden_layers=int(_require(cfg, "num_hidden_layers", config_path)),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden_size // num_heads),
        vocab_size=int(_require(cfg, "vocab_size", config_path)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) and architecture == "LlamaForCausalLM",
        qk_norm=is_qwen3,
        sliding_window=int(sliding_window) if sliding_window is not None else None,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        hidden_act=hidden_act,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos,
        quantization=checkpoint_quantization(cfg),
    )
