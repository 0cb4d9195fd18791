"""What a checkpoint's ``quantization_config`` (``config.json``) says, torch-free.

vserve runs one quantization, FP8: float8 e4m3 weights of the decoder's linear layers (q/k/v,
o, gate/up, down) with one float32 scale per output channel (a per-tensor scale is the same
scale repeated over the channels). The embedding and the LM head stay in the model dtype.
Weights come either from an FP8 checkpoint, in one of the two formats Hugging Face FP8
models ship:

* ``quant_method: compressed-tensors`` (llm-compressor, ``format: float-quantized``): one
  config group over ``Linear`` whose ``weights`` are 8-bit symmetric floats with the
  ``channel`` or ``tensor`` strategy; ``input_activations`` absent (weight-only), dynamic
  per ``token``, or static per ``tensor`` (an ``input_scale`` per layer); ``ignore`` may
  name ``lm_head`` only; a ``kv_cache_scheme`` of static per-tensor 8-bit float scales
  brings each layer's ``k_scale``/``v_scale`` (older files: ``k_proj.output_scale``,
  ``v_proj.output_scale``), used by a float8 KV cache (``--kv-cache-dtype fp8``);
* ``quant_method: fp8`` (AutoFP8, vLLM's own): a per-tensor ``weight_scale``,
  ``activation_scheme`` ``dynamic`` or ``static``;

or from a 16-bit checkpoint quantized as it loads (``--quantization fp8``: per-channel
scales, dynamic per-token activations). Anything else in a ``quantization_config`` is
refused with the field that is not supported, never loaded as if it were plain weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ActivationScheme = Literal["none", "dynamic", "static"]


@dataclass(frozen=True)
class Fp8Scheme:
    """How the FP8 linear layers of one model get and use their scales.

    ``prequantized``: the checkpoint holds float8 weights and their ``weight_scale``;
    otherwise 16-bit weights are quantized per output channel as they load.
    ``activations``: on the GPU, matmuls of more than one row multiply float8 activations —
    ``dynamic`` scaled per token as they run, ``static`` by the checkpoint's ``input_scale``
    — or (``none``, weight-only) the dequantized weights with 16-bit activations. The CPU
    path always multiplies the dequantized weights with the activations unquantized (the
    reference, equal to transformers running the decompressed checkpoint).
    """

    prequantized: bool
    activations: ActivationScheme
    source: str  # for messages: "compressed-tensors", "fp8", or "--quantization fp8"
    #: The checkpoint holds each attention layer's ``k_scale`` and ``v_scale`` (calibrated
    #: per-tensor scales of the keys after RoPE and of the values) for a float8 KV cache.
    kv_cache_scales: bool = False


#: ``--quantization fp8`` on a 16-bit checkpoint.
LOAD_TIME_FP8 = Fp8Scheme(prequantized=False, activations="dynamic",
                          source="--quantization fp8")


def _refuse(what: str) -> ValueError:
    return ValueError(f"Unsupported quantization_config: {what}; vserve loads FP8 checkpoints "
                      "(compressed-tensors float8 with channel or tensor weight scales, or "
                      "quant_method fp8 with per-tensor scales)")


def _compressed_tensors(q: dict[str, Any]) -> Fp8Scheme:
    fmt = q.get("format", "float-quantized")
    if fmt != "float-quantized":
        raise _refuse(f"format {fmt!r}")
    kv = q.get("kv_cache_scheme")
    if kv and (kv.get("type") != "float" or kv.get("num_bits") != 8
               or kv.get("symmetric") is False or kv.get("dynamic")
               or kv.get("strategy", "tensor") != "tensor"):
        raise _refuse(f"kv_cache_scheme: {kv.get('num_bits')}-bit {kv.get('type')}, strategy "
                      f"{kv.get('strategy')!r}, dynamic={kv.get('dynamic')} (only static "
                      "per-tensor symmetric 8-bit float scales)")
    ignore = [str(x) for x in q.get("ignore") or []]
    others = [x for x in ignore if x not in ("lm_head", "re:.*lm_head")]
    if others:
        raise _refuse(f"ignore lists {', '.join(others)} (only lm_head may stay unquantized)")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(f"{len(groups)} config_groups (exactly one is supported)")
    (name, group), = groups.items()
    targets = group.get("targets") or []
    if "Linear" not in targets:
        raise _refuse(f"config_groups.{name}.targets {targets} (must include Linear)")
    w = group.get("weights") or {}
    where = f"config_groups.{name}.weights"
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise _refuse(f"{where}: {w.get('num_bits')}-bit {w.get('type')} (only 8-bit float)")
    if w.get("strategy") not in ("channel", "tensor"):
        raise _refuse(f"{where}.strategy {w.get('strategy')!r} (channel or tensor)")
    if w.get("symmetric") is False or w.get("dynamic") or w.get("group_size") \
            or w.get("block_structure"):
        raise _refuse(f"{where}: asymmetric, dynamic, grouped or block scales")
    if group.get("output_activations"):
        raise _refuse(f"config_groups.{name}.output_activations")
    a = group.get("input_activations")
    activations: ActivationScheme = "none"
    if a:
        where = f"config_groups.{name}.input_activations"
        if a.get("type") != "float" or a.get("num_bits") != 8 or a.get("symmetric") is False:
            raise _refuse(f"{where}: {a.get('num_bits')}-bit {a.get('type')} "
                          "(only symmetric 8-bit float)")
        if a.get("dynamic") and a.get("strategy") == "token":
            activations = "dynamic"
        elif not a.get("dynamic") and a.get("strategy") == "tensor":
            activations = "static"
        else:
            raise _refuse(f"{where}: dynamic={a.get('dynamic')} strategy={a.get('strategy')!r} "
                          "(dynamic per token or static per tensor)")
    return Fp8Scheme(prequantized=True, activations=activations, source="compressed-tensors",
                     kv_cache_scales=bool(kv))


def _fp8(q: dict[str, Any]) -> Fp8Scheme:
    if q.get("weight_block_size"):
        raise _refuse(f"weight_block_size {q['weight_block_size']} (block-wise FP8 scales)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _refuse(f"activation_scheme {scheme!r}")
    ignored = [str(x) for x in q.get("ignored_layers") or [] if x != "lm_head"]
    if ignored:
        raise _refuse(f"ignored_layers lists {', '.join(ignored)}")
    return Fp8Scheme(prequantized=True, activations=scheme, source="fp8")


def checkpoint_quantization(cfg: dict[str, Any]) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint's ``config.json`` (None for a plain checkpoint).

    Raises ``ValueError`` naming the unsupported field for any other quantization."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise _refuse(f"{q!r} is not an object")
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method == "fp8":
        return _fp8(q)
    raise _refuse(f"quant_method {method!r}")


def resolve_quantization(requested: str | None, checkpoint: Fp8Scheme | None
                         ) -> Fp8Scheme | None:
    """What to run: the checkpoint's FP8 as it is, or a 16-bit checkpoint quantized at load
    time when ``requested`` is ``fp8``; None for 16-bit weights."""
    if requested not in (None, "fp8"):
        raise ValueError(f"quantization must be fp8 or unset, got {requested!r}")
    if checkpoint is not None:
        return checkpoint
    return LOAD_TIME_FP8 if requested == "fp8" else None
