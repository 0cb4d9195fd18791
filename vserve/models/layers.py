"""Building blocks of the Llama family: RMSNorm, rotary embedding, SiLU-and-multiply.

Numerics follow the transformers implementations operation for operation (normalization in
float32 then cast back before the weight multiply; cos/sin computed in float32 then cast to the
activations' dtype), so that float32 logits agree with Hugging Face to ~1e-6.

On CUDA, RMSNorm (with its fused residual add) and SiLU-and-multiply run as single-pass
Triton kernels (:mod:`vserve.ops`) with the same rounding points; RoPE is applied inside the
attention kernels (see ``TritonAttentionBackend.forward_rope``). The CPU path is plain torch.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, overload

import torch
import torch.nn.functional as F
from torch import nn

from vserve.models.arch import SUPPORTED_ROPE_TYPES
from vserve.models.fp8 import Fp8Linear
from vserve.ops import use_kernels


class Collectives(Protocol):
    """What a tensor-parallel model needs of its group (``vserve.worker.tensor_parallel``)."""

    rank: int
    size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension.

    ``forward(x, residual)`` fuses the residual add: it returns ``(norm(x + residual),
    x + residual)`` so that a decoder layer carries the un-normalized stream along without an
    extra pass. On CUDA that is one Triton kernel which works in place: the returned tensors
    are ``x`` and ``residual`` themselves, overwritten.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op instead of six; for float32 it equals the expression below bit for
            # bit (not for 16-bit inputs, where HF rounds before the weight multiply).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        input_dtype = x.dtype
        xf = x.to(torch.float32)
        variance = xf.pow(2).mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(variance + self.eps)).to(input_dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_kernels(x):
            from vserve.ops.layernorm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _inverse_frequencies(
    head_dim: int, base: float, rope_scaling: dict[str, Any] | None
) -> torch.Tensor:
    """Per-pair rotation frequencies, float32, ``[head_dim // 2]``, scaled as configured."""
    rope_type = "default" if rope_scaling is None else str(rope_scaling.get("rope_type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope_type {rope_type!r}; vserve supports: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_scaling is None or rope_type == "default":
        return inv_freq
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        # Scaling positions by 1/factor is the same as scaling the frequencies.
        return inv_freq / factor
    # llama3: leave high frequencies alone, divide low ones by factor, blend in between.
    low_freq_factor = float(rope_scaling["low_freq_factor"])
    high_freq_factor = float(rope_scaling["high_freq_factor"])
    old_context_len = float(rope_scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (``rotate_half``, as HF Llama) with a cos/sin cache indexed by position.

    Invariant: the cache buffers are float32 whatever the model dtype (they are created with an
    explicit dtype, so a default-dtype context does not lower them); positions must lie in
    ``[0, max_position)``. Only ``[max_position, head_dim // 2]`` is stored since both halves of
    a head use the same angles.
    """

    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = _inverse_frequencies(head_dim, base, rope_scaling)
        # Same op order as HF (float positions times float inv_freq), so the angles match
        # bit for bit.
        positions = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[T, head_dim // 2]`` float32 for ``positions`` ``[T]``.

        Computed once per step and shared by all layers.
        """
        return self.cos_cache[positions], self.sin_cache[positions]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by the angles of ``cos``/``sin`` ``[T, D/2]``.

    Equals HF's ``x * cat(cos, cos) + rotate_half(x) * sin`` term by term (``a + (-b)`` and
    ``a - b`` round identically), after casting cos/sin to ``x.dtype`` as HF does.
    """
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def linear(x: torch.Tensor, layer: nn.Linear | Fp8Linear, act: bool = False) -> torch.Tensor:
    """``layer(silu_and_mul(x) if act else x)``; on CUDA through :func:`vserve.ops.linear.linear`
    (single-token rows may take a Triton GEMV with the activation fused into its input), or
    :func:`vserve.ops.fp8.fp8_linear` for FP8 weights."""
    if x.is_cuda and use_kernels(x):
        if isinstance(layer, Fp8Linear):
            from vserve.ops.fp8 import fp8_linear

            return fp8_linear(x, layer.weight, layer.weight_scale, layer.bias, act,
                              layer.input_scale, layer.scheme.activations)
        from vserve.ops.linear import linear as kernel_linear

        return kernel_linear(x, layer.weight, layer.bias, act)
    if act:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    return layer(x)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                layer: nn.Linear | Fp8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer(norm(x + residual)), x + residual)``, or ``(layer(norm(x)), x)`` without a
    residual. On CUDA a single-token row may take one Triton kernel for all of it
    (:func:`vserve.ops.linear.norm_linear`, chosen by measurement); the inputs may be
    overwritten either way."""
    if x.is_cuda and use_kernels(x):
        from vserve.ops.linear import norm_linear as kernel_norm_linear

        if isinstance(layer, Fp8Linear):
            from vserve.ops.fp8 import fp8_linear

            def matmul(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return fp8_linear(h, w, layer.weight_scale, layer.bias, False,
                                  layer.input_scale, layer.scheme.activations)

            fused = kernel_norm_linear(x, residual, norm.weight, norm.eps, layer.weight,
                                       layer.bias, layer.weight_scale, matmul)
        else:
            fused = kernel_norm_linear(x, residual, norm.weight, norm.eps, layer.weight,
                                       layer.bias)
        if fused is not None:
            return fused
    if residual is None:
        return linear(norm(x), layer), x
    h, residual = norm(x, residual)
    return linear(h, layer), residual


class SiluAndMul(nn.Module):
    """``silu(x[..., :n]) * x[..., n:]`` for ``x`` of last dimension ``2n`` (merged gate/up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            from vserve.ops.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
