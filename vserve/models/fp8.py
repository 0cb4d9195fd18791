"""The FP8 linear layer: float8 e4m3 weights, one float32 scale per output channel.

Formats and the scheme's meaning: :mod:`vserve.models.quant_config`. The layer computes
``x @ (weight * weight_scale[:, None])^T + bias``. Here (``forward``) the weights are
dequantized and multiplied in the activations' dtype — the CPU path and the reference;
on CUDA :func:`vserve.models.layers.linear` sends the layer to :mod:`vserve.ops.fp8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vserve.models.quant_config import Fp8Scheme

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A channel of zeros gets this scale rather than 0 (whose inverse would be inf).
_MIN_SCALE = 1e-12


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[N, K]`` (any float dtype) → (float8 ``[N, K]``, float32 scales ``[N]``)
    such that ``w8.float() * scale[:, None]`` approximates ``weight``: each row's largest
    magnitude maps to the largest float8 value, 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    w8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize_per_channel`, rounded to ``dtype`` once."""
    return (weight.float() * scale[:, None]).to(dtype)


class Fp8Linear(nn.Module):
    """A linear layer whose weight is float8 with per-output-channel scales.

    Rows may be loaded in slices (the shards of a merged q/k/v or gate/up projection):
    :meth:`load` takes a checkpoint tensor for rows ``start .. start + size``. With a
    ``static`` scheme, ``input_scale`` holds the checkpoint's activation scale, the largest
    of the merged shards' (they scale the same input).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 scheme: Fp8Scheme) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        # Every row is written by ``load`` (the loader reports any left unloaded).
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_scale = (nn.Parameter(torch.zeros(1, dtype=torch.float32),
                                         requires_grad=False)
                            if scheme.activations == "static" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    @torch.no_grad()
    def load(self, attr: str, start: int, size: int, tensor: torch.Tensor) -> list[str]:
        """Load checkpoint tensor ``attr`` (``weight``, ``weight_scale``, ``input_scale`` or
        ``bias``) of rows ``start .. start + size``; returns the attributes now loaded for
        those rows (a 16-bit ``weight`` quantized here brings its ``weight_scale``).
        Raises ``ValueError`` saying what does not fit."""
        if attr == "weight":
            if tuple(tensor.shape) != (size, self.in_features):
                raise ValueError(f"checkpoint {tuple(tensor.shape)} vs model "
                                 f"{(size, self.in_features)}")
            if tensor.dtype == FP8_DTYPE:
                self.weight[start:start + size].copy_(tensor)
                return ["weight"]
            if self.scheme.prequantized or not tensor.dtype.is_floating_point \
                    or tensor.element_size() == 1:
                raise ValueError(f"a {self.scheme.source} checkpoint needs float8_e4m3fn "
                                 f"weights, got {tensor.dtype}")
            w8, scale = quantize_per_channel(tensor.to(self.weight.device))
            self.weight[start:start + size].copy_(w8)
            self.weight_scale[start:start + size].copy_(scale)
            return ["weight", "weight_scale"]
        if attr == "weight_scale":
            if tensor.numel() == 1:  # per-tensor: the same scale for every row
                self.weight_scale[start:start + size].fill_(float(tensor.reshape(())))
            elif tensor.numel() == size and tensor.dim() <= 2 and tensor.shape[0] == size:
                self.weight_scale[start:start + size].copy_(tensor.reshape(size))
            else:
                raise ValueError(f"weight_scale {tuple(tensor.shape)} fits neither one scale "
                                 f"nor {size} rows")
            if not bool((self.weight_scale[start:start + size] > 0).all()):
                raise ValueError("weight_scale holds a scale that is not positive")
            return ["weight_scale"]
        if attr == "input_scale":
            if self.input_scale is None:
                raise ValueError(f"input_scale in a checkpoint whose activations are "
                                 f"{self.scheme.activations}")
            if tensor.numel() != 1 or not float(tensor.reshape(())) > 0:
                raise ValueError(f"input_scale must be one positive value, got "
                                 f"{tuple(tensor.shape)}")
            self.input_scale.fill_(max(float(self.input_scale), float(tensor.reshape(()))))
            return ["input_scale"]
        if attr == "bias" and self.bias is not None:
            if tuple(tensor.shape) != (size,):
                raise ValueError(f"bias {tuple(tensor.shape)} vs model ({size},)")
            self.bias[start:start + size].copy_(tensor)
            return ["bias"]
        raise ValueError(f"{attr} is not a tensor of an FP8 linear layer")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 ({self.scheme.source}, activations "
                f"{self.scheme.activations})")


def check_fp8_device(device: torch.device,
                     feature: str = "FP8 weights (quantization fp8)") -> None:
    """FP8 matmuls (and float8 KV caches) run on CPUs and on GPUs with float8 support
    (compute capability 8.9: Ada, Hopper and later; Triton's float8 e4m3 type needs it too);
    refuse older GPUs before any weight loads."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"{feature} needs a GPU of compute capability "
                         f"8.9 or newer; {torch.cuda.get_device_name(device)} is "
                         f"{major}.{minor}")


def make_linear(in_features: int, out_features: int, bias: bool,
                scheme: Fp8Scheme | None) -> nn.Linear | Fp8Linear:
    """An ``nn.Linear`` for 16-bit weights, an :class:`Fp8Linear` under an FP8 scheme."""
    if scheme is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return Fp8Linear(in_features, out_features, bias, scheme)
