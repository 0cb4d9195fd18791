"""One decoder implementation for Llama 2/3, Mistral, Qwen2 and Qwen3.

The variants differ only in flags of :class:`ModelArchConfig`: q/k/v bias (Qwen2), o_proj
bias, per-head q/k RMSNorm before RoPE (Qwen3, whose head_dim may differ from
hidden/heads), RoPE scaling (Llama 3), tied embeddings.

The model consumes a flat batch: ``input_ids`` and ``positions`` are ``[T]`` over all
sequences of the step, and sequence boundaries live only in the attention metadata, so every
layer but attention is a plain per-token op.

Parameter names mirror the HF checkpoint except for two merges, made so that each attention
and MLP input is one matmul: ``q_proj``/``k_proj``/``v_proj`` → ``qkv_proj`` (rows in q, k, v
order) and ``gate_proj``/``up_proj`` → ``gate_up_proj`` (gate rows first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vserve.attention.backend import AttentionBackend, AttentionMetadata
from vserve.models.arch import ModelArchConfig
from vserve.models.fp8 import Fp8Linear, make_linear
from vserve.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    apply_rotary,
    linear,
    norm_linear,
)
from vserve.ops import use_kernels

if TYPE_CHECKING:
    from vserve.models.layers import Collectives
    from vserve.models.quant_config import Fp8Scheme

# (merged parameter, checkpoint name, shard index): shards are stacked along dim 0.
_STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class ShardLayout:
    """What rank ``rank`` of ``size`` tensor-parallel ranks holds (all of it when ``size`` is
    1): whole attention heads (KV heads split, or replicated when there are fewer KV heads
    than ranks), a slice of the MLP's intermediate dimension and of the vocabulary. The
    column-parallel projections (qkv, gate/up, embedding, LM head) keep their output slice;
    the row-parallel ones (o, down) their input slice, their bias on rank 0 only, and an
    all-reduce after them."""

    def __init__(self, arch: ModelArchConfig, rank: int = 0, size: int = 1) -> None:
        heads, kv, inter, vocab = (arch.num_attention_heads, arch.num_key_value_heads,
                                   arch.intermediate_size, arch.vocab_size)
        bad = [f"{what} ({n})" for what, n in (
            ("num_attention_heads", heads), ("intermediate_size", inter),
            ("vocab_size", vocab)) if n % size]
        if kv % size and size % kv:
            bad.append(f"num_key_value_heads ({kv}, nor a divisor of it)")
        if bad:
            raise ValueError(f"tensor_parallel_size={size} does not divide "
                             + ", ".join(bad))
        self.rank, self.size = rank, size
        self.head_dim = arch.head_dim
        self.num_heads = heads // size
        self.num_kv_heads = kv // size if kv >= size else 1
        self.first_kv_head = rank * self.num_kv_heads if kv >= size else rank * kv // size
        self.intermediate_size = inter // size
        self.vocab_size = vocab // size
        self.first_token = rank * self.vocab_size

    def shard(self, name: str, tensor: Any) -> torch.Tensor:
        """This rank's part of the checkpoint tensor ``name`` (HF naming). ``tensor`` is a
        tensor or a safetensors slice (``safe_open(...).get_slice``): from a slice only this
        rank's part is read."""
        hd, r = self.head_dim, self.rank
        if self.size == 1 or (name.endswith("_scale") and _numel(tensor) == 1):
            return _part(tensor, 0, 0, None)  # all of it, or an FP8 per-tensor scale
        if ".q_proj." in name:
            return _part(tensor, 0, r * self.num_heads * hd, self.num_heads * hd)
        if ".k_proj." in name or ".v_proj." in name:
            return _part(tensor, 0, self.first_kv_head * hd, self.num_kv_heads * hd)
        if ".gate_proj." in name or ".up_proj." in name:
            return _part(tensor, 0, r * self.intermediate_size, self.intermediate_size)
        if name.endswith((".o_proj.bias", ".down_proj.bias")):
            whole = _part(tensor, 0, 0, None)
            return whole if r == 0 else torch.zeros_like(whole)
        if name.endswith(".o_proj.weight"):
            return _part(tensor, 1, r * self.num_heads * hd, self.num_heads * hd)
        if name.endswith(".down_proj.weight"):
            return _part(tensor, 1, r * self.intermediate_size, self.intermediate_size)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return _part(tensor, 0, self.first_token, self.vocab_size)
        return _part(tensor, 0, 0, None)  # norms: every rank holds them whole


def _numel(tensor: Any) -> int:
    """Elements of a tensor or a safetensors slice."""
    return math.prod(tensor.shape if isinstance(tensor, torch.Tensor) else tensor.get_shape())


def _part(tensor: Any, dim: int, start: int, length: int | None) -> torch.Tensor:
    """``tensor``'s rows (``dim`` 0) or columns (1) ``start .. start+length`` (all of it
    for ``length`` None), from a tensor or a safetensors slice."""
    if isinstance(tensor, torch.Tensor):
        return tensor if length is None else tensor.narrow(dim, start, length)
    if length is None:
        return tensor[:]
    return tensor[start : start + length] if dim == 0 else tensor[:, start : start + length]


class RopeInputs(NamedTuple):
    """What the attention layers need for RoPE in one step: gathered ``cos``/``sin``
    (torch path), or the positions and the float32 caches for kernels that rotate inside
    attention (``fused``)."""

    fused: bool
    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    cos_cache: torch.Tensor | None
    sin_cache: torch.Tensor | None


def _kv_cache_scale_name(ckpt_name: str) -> tuple[str, str] | None:
    """``(attention module, "k_scale" | "v_scale")`` for a checkpoint's float8 KV-cache scale
    (``…self_attn.k_scale``, or the older ``…self_attn.k_proj.output_scale``), else None."""
    for suffix, attr in ((".k_scale", "k_scale"), (".v_scale", "v_scale"),
                         (".k_proj.output_scale", "k_scale"),
                         (".v_proj.output_scale", "v_scale")):
        if ckpt_name.endswith(suffix):
            return ckpt_name[: -len(suffix)], attr
    return None


def _checkpoint_name(name: str, shard: int | None) -> str:
    """The HF name of shard ``shard`` of parameter ``name`` (``name`` itself if unmerged)."""
    if shard is None:
        return name
    for merged, part, index in _STACKED_PARAMS:
        if index == shard and f".{merged}." in name:
            return name.replace(f".{merged}.", f".{part}.")
    raise AssertionError(f"no shard {shard} of {name}")


def _name_list(names: list[str], sep: str = ", ", limit: int = 20) -> str:
    """The first ``limit`` names; a wrong checkpoint can mismatch thousands of tensors."""
    more = f"{sep}... ({len(names) - limit} more)" if len(names) > limit else ""
    return sep.join(names[:limit]) + more


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, attn_backend: AttentionBackend,
                 layout: ShardLayout, tp: Collectives | None = None,
                 quantization: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = make_linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                    arch.attention_bias, quantization)
        self.o_proj = make_linear(self.q_size, arch.hidden_size, arch.o_proj_bias,
                                  quantization)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        # A plain attribute, not a submodule: the backend holds no parameters.
        self.attn_backend = attn_backend
        # A float8 KV cache's scales: a checkpoint's (kv_cache_scheme), else 1. Plain floats,
        # set by load_weights before any CUDA graph captures them.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        qkv: torch.Tensor,
        rope: RopeInputs,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention from the output of ``qkv_proj`` (applied by the decoder layer, fused
        with the input norm where that pays); returns ``o_proj``'s output."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Views of the qkv output (no copies); the kernels take their strides.
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        k_cache, v_cache = kv_cache
        if rope.fused:
            # RoPE inside the attention kernels (q rotated in place, k on its way to the cache).
            assert rope.cos_cache is not None and rope.sin_cache is not None
            out = self.attn_backend.forward_rope(
                q, k, v, rope.positions, rope.cos_cache, rope.sin_cache, k_cache, v_cache,
                attn_metadata, self.scale, k_scale=self.k_scale, v_scale=self.v_scale)
        else:
            assert rope.cos is not None and rope.sin is not None
            if self.q_norm is None:
                # q's and k's heads sit side by side in the qkv row: one rotation for both.
                qk = qkv[:, : self.q_size + self.kv_size].view(
                    num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
                q, k = apply_rotary(qk, rope.cos, rope.sin).split(
                    [self.num_heads, self.num_kv_heads], dim=1)
            else:
                q = apply_rotary(q, rope.cos, rope.sin)
                k = apply_rotary(k, rope.cos, rope.sin)
            out = self.attn_backend.forward(q, k, v, k_cache, v_cache, attn_metadata, self.scale,
                                            k_scale=self.k_scale, v_scale=self.v_scale)
        out = linear(out.reshape(num_tokens, self.q_size), self.o_proj)
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchConfig, layout: ShardLayout,
                 tp: Collectives | None = None, quantization: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.tp = tp
        inter = layout.intermediate_size
        self.gate_up_proj = make_linear(arch.hidden_size, 2 * inter, arch.mlp_bias,
                                        quantization)
        self.down_proj = make_linear(inter, arch.hidden_size, arch.mlp_bias, quantization)
        self.act_fn = SiluAndMul()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from the output of ``gate_up_proj`` (applied by the decoder layer, fused
        with the post-attention norm where that pays)."""
        if gate_up.is_cuda and use_kernels(gate_up):
            # SiLU-and-multiply fused into the down projection's input when it is a GEMV.
            out = linear(gate_up, self.down_proj, act=True)
        else:
            out = self.down_proj(self.act_fn(gate_up))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig, attn_backend: AttentionBackend,
                 layout: ShardLayout, tp: Collectives | None = None,
                 quantization: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, attn_backend, layout, tp, quantization)
        self.mlp = LlamaMLP(arch, layout, tp, quantization)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeInputs,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp_out, residual)``; the caller adds them (in the next norm)."""
        qkv, residual = norm_linear(hidden, residual, self.input_layernorm,
                                    self.self_attn.qkv_proj)
        hidden = self.self_attn(qkv, rope, kv_cache, attn_metadata)
        gate_up, residual = norm_linear(hidden, residual, self.post_attention_layernorm,
                                        self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, attn_backend: AttentionBackend,
                 layout: ShardLayout, tp: Collectives | None = None,
                 quantization: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.layout = layout
        self.embed_tokens = nn.Embedding(layout.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, attn_backend, layout, tp, quantization)
            for _ in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        # One cache shared by all layers; cos/sin are gathered once per step.
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self._fused_rope = attn_backend.fuses_rope

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(
                f"got {len(kv_caches)} KV caches for a model of {len(self.layers)} layers"
            )
        hidden = self._embed(input_ids)
        if self._fused_rope and use_kernels(hidden):
            rope = RopeInputs(True, positions, None, None, self.rotary_emb.cos_cache,
                              self.rotary_emb.sin_cache)
        else:
            cos, sin = self.rotary_emb.cos_sin(positions)
            rope = RopeInputs(False, positions, cos, sin, None, None)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, attn_metadata)
        if residual is None:  # a model of zero layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        # Vocabulary-parallel: each rank embeds the ids of its slice, zeros elsewhere.
        local = input_ids - self.layout.first_token
        mine = (local >= 0) & (local < self.layout.vocab_size)
        hidden = self.embed_tokens(local.clamp(0, self.layout.vocab_size - 1))
        hidden = hidden * mine.unsqueeze(-1).to(hidden.dtype)
        return self.tp.all_reduce(hidden)


class LlamaForCausalLM(nn.Module):
    """The causal LM the model runner drives (see the module docstring for the batch layout).

    With ``tie_word_embeddings`` there is no ``lm_head`` parameter: logits use
    ``model.embed_tokens.weight``, and a checkpoint's ``lm_head.weight`` (present or not) is
    ignored.
    """

    def __init__(self, arch: ModelArchConfig, attn_backend: AttentionBackend,
                 tp: Collectives | None = None, quantization: Fp8Scheme | None = None) -> None:
        """``tp``: this rank's tensor-parallel group; the model then holds only its shard
        (``ShardLayout``) and loads only that part of each checkpoint tensor.
        ``quantization``: the decoder's linear layers hold FP8 weights (``Fp8Linear``)."""
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.layout = ShardLayout(arch, tp.rank, tp.size) if tp is not None else \
            ShardLayout(arch)
        layout = self.layout
        self.model = LlamaModel(arch, attn_backend, layout, tp, quantization)
        # Each attention layer's float8 KV-cache scales come with the checkpoint.
        self._kv_cache_scales = quantization is not None and quantization.kv_cache_scales
        self.lm_head: nn.Linear | None = None
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, layout.vocab_size, bias=False)
        q_size = layout.num_heads * arch.head_dim
        kv_size = layout.num_kv_heads * arch.head_dim
        inter = layout.intermediate_size
        # Row counts of the shards stacked in each merged parameter, in _STACKED_PARAMS order.
        self._shard_sizes: dict[str, list[int]] = {
            "qkv_proj": [q_size, kv_size, kv_size],
            "gate_up_proj": [inter, inter],
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` int64 → final hidden states ``[T, hidden]``."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[S, hidden]`` → ``[S, vocab]`` float32 (matmul in the model dtype, like HF).

        With ``out`` (``[S, vocab]``, float32 or the model dtype: the CUDA graphs' persistent
        logits buffer), the product is written into it (rounded to the model dtype first, so
        either holds the same values) and ``out`` is returned.
        """
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if hidden.is_cuda and use_kernels(hidden):
            from vserve.ops.linear import linear as kernel_linear

            if out is not None:
                return kernel_linear(hidden, weight, out=out)
            logits = kernel_linear(hidden, weight)
        else:
            logits = F.linear(hidden, weight)
        if self.tp is not None:  # vocabulary-parallel head: gather the slices
            logits = self.tp.all_gather_last(logits.float())
        if out is not None:
            return out.copy_(logits)
        return logits.float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the (merged) parameters.

        With tensor parallelism the tensors are this rank's parts (``ShardLayout.shard``,
        applied by the loader as it reads). Every parameter (every shard of a merged one)
        must be loaded exactly as the checkpoint names it; raises ``ValueError`` listing
        unexpected tensors, shape mismatches and parameters left unloaded. Tensors are
        converted to each parameter's dtype and device; FP8 layers take theirs through
        ``Fp8Linear.load`` (a 16-bit weight is quantized there and brings its scale). Under a
        ``kv_cache_scheme`` every attention layer's ``k_scale`` and ``v_scale`` must come too
        (one positive number each; ``_kv_cache_scale_name`` lists the accepted names).
        """
        params = dict(self.named_parameters())
        fp8_layers = {n: m for n, m in self.named_modules() if isinstance(m, Fp8Linear)}
        attention = ({n: m for n, m in self.named_modules() if isinstance(m, LlamaAttention)}
                     if self._kv_cache_scales else {})
        # name → shard indices still to load (a single None for unmerged parameters)
        pending: dict[str, set[int | None]] = {}
        for name in params:
            merged = next((m for m, _, _ in _STACKED_PARAMS if f".{m}." in name), None)
            pending[name] = set(range(len(self._shard_sizes[merged]))) if merged else {None}
        for name in attention:
            pending[f"{name}.k_scale"] = {None}
            pending[f"{name}.v_scale"] = {None}
        unexpected: list[str] = []
        mismatched: list[str] = []
        for ckpt_name, tensor in weights:
            if "rotary_emb." in ckpt_name:
                continue  # inv_freq / cos / sin caches some checkpoints carry
            kv_scale = _kv_cache_scale_name(ckpt_name) if attention else None
            if kv_scale is not None:
                module_name, attr = kv_scale
                value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else 0.0
                if module_name not in attention:
                    unexpected.append(ckpt_name)
                elif not 0.0 < value < float("inf"):
                    mismatched.append(f"{ckpt_name}: a KV-cache scale must be one positive "
                                      f"number, got {tuple(tensor.shape)} {tensor.flatten()[:4]}")
                else:
                    setattr(attention[module_name], attr, value)
                    pending[f"{module_name}.{attr}"].discard(None)
                continue
            if self.lm_head is None and ckpt_name == "lm_head.weight":
                continue  # tied: the embedding is the head
            name, shard = ckpt_name, None
            for merged, part, index in _STACKED_PARAMS:
                if f".{part}." in ckpt_name:
                    name, shard = ckpt_name.replace(f".{part}.", f".{merged}."), index
                    break
            param = params.get(name)
            if param is None:
                unexpected.append(ckpt_name)
                continue
            module_name, _, attr = name.rpartition(".")
            start, size = 0, param.shape[0]
            if shard is not None:
                sizes = self._shard_sizes[module_name.rpartition(".")[2]]  # ...<merged>
                start, size = sum(sizes[:shard]), sizes[shard]
            fp8 = fp8_layers.get(module_name)
            if fp8 is not None:
                try:
                    loaded = fp8.load(attr, start, size, tensor)
                except ValueError as e:
                    mismatched.append(f"{ckpt_name}: {e}")
                    continue
                for a in loaded:
                    pending[f"{module_name}.{a}"].discard(shard)
                continue
            target = param.data
            if shard is not None:
                target = target.narrow(0, start, size)
            if tuple(target.shape) != tuple(tensor.shape):
                mismatched.append(
                    f"{ckpt_name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}"
                )
                continue
            target.copy_(tensor)
            pending[name].discard(shard)
        missing = [
            _checkpoint_name(name, shard)
            for name, shards in pending.items()
            for shard in sorted(shards, key=lambda s: -1 if s is None else s)
        ]
        problems = []
        if unexpected:
            problems.append(f"unexpected checkpoint tensors: {_name_list(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_name_list(mismatched, '; ')}")
        if missing:
            problems.append(f"parameters left unloaded: {_name_list(missing)}")
        if problems:
            raise ValueError("Cannot load weights: " + " | ".join(problems))
