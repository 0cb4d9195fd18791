"""Choosing a model's dtype, reading its safetensors, building it (model paths are resolved
by the torch-free :mod:`vserve.models.source`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from vserve.attention.backend import AttentionBackend
from vserve.models.arch import ModelArchConfig
from vserve.models.registry import get_model_class

if TYPE_CHECKING:
    from vserve.models.layers import Collectives
    from vserve.models.quant_config import Fp8Scheme

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Checkpoint names transformers has written over the years for the same dtypes.
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}
_INDEX_FILE = "model.safetensors.index.json"

logger = logging.getLogger(__name__)


def resolve_dtype(arch: ModelArchConfig, requested: str, device: torch.device) -> torch.dtype:
    """The dtype to run in.

    ``auto`` is the checkpoint's ``torch_dtype``, float32 when the checkpoint does not say.
    An explicit request is honoured as is, on CPU too: PyTorch runs float16 matmuls on CPU
    (slowly on CPUs without native half support), and silently switching dtype would make
    CPU and GPU runs of the same request disagree; pass ``float32``/``bfloat16`` for speed.
    On CUDA, bfloat16 on a GPU without bf16 support is an error rather than a silent switch.
    """
    name = requested
    if requested == "auto":
        name = arch.torch_dtype or "float32"
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        source = "the checkpoint's torch_dtype" if requested == "auto" else "dtype"
        raise ValueError(f"Unsupported {source} {name!r}; vserve supports: {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if (
        dtype == torch.bfloat16
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise ValueError("This GPU does not support bfloat16; pass dtype float16 or float32")
    return dtype


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / _INDEX_FILE
    if index.is_file():
        with index.open(encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"Shard {file.name} listed in {index} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {model_dir}")
    return files


def iterate_weights(model_dir: Path, part: Callable[[str, Any], torch.Tensor] | None = None,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the checkpoint, on CPU, in file order.

    Sources, first match wins: ``model.safetensors``; the shards listed by
    ``model.safetensors.index.json``; every ``*.safetensors`` file. Missing files are
    reported before any tensor is yielded. ``part(name, slice)``: read only that part of
    each tensor (a tensor-parallel rank's shard) from its safetensors slice.
    """
    files = _safetensors_files(Path(model_dir))
    progress = _LoadProgress(files)
    for i, file in enumerate(files):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name) if part is None else part(name, f.get_slice(name))
                progress.add(tensor.numel() * tensor.element_size(), i)
                yield name, tensor
    progress.done()


class _LoadProgress:
    """Log lines while weights load (at most one per ``interval`` seconds) and a last one
    with the rate: loading a large checkpoint from a network disk takes minutes."""

    def __init__(self, files: list[Path], interval: float = 5.0) -> None:
        self.files = files
        self.total = sum(f.stat().st_size for f in files)
        self.loaded = 0
        self.t0 = self.last = time.monotonic()
        self.interval = interval

    def add(self, nbytes: int, file_index: int) -> None:
        self.loaded += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            logger.info("loading weights: %.0f%% (%.2f / %.2f GiB, file %d of %d)",
                        100 * self.loaded / max(1, self.total), self.loaded / 2**30,
                        self.total / 2**30, file_index + 1, len(self.files))

    def done(self) -> None:
        took = time.monotonic() - self.t0
        logger.info("loaded %.2f GiB of weights from %d file%s in %.1fs (%.2f GiB/s)",
                    self.loaded / 2**30, len(self.files), "s" if len(self.files) != 1 else "",
                    took, self.loaded / 2**30 / max(took, 1e-9))


def load_model(
    model_dir: Path,
    arch: ModelArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    tp: Collectives | None = None,
    quantization: Fp8Scheme | None = None,
) -> nn.Module:
    """Build the model directly on ``device`` in ``dtype``, load its weights, set eval mode.
    ``quantization``: the decoder's linear layers hold FP8 weights (a 16-bit checkpoint's
    are quantized as they load, one tensor at a time).

    Parameters are allocated where they will live (no float32 CPU copy first); the RoPE cache
    stays float32 by construction. Callers run the model under ``torch.inference_mode()``.
    """
    cls = get_model_class(arch.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            # ``tp``: a tensor-parallel rank's group; the model then holds its shard only.
            model = cls(arch, attn_backend, tp, quantization)
    finally:
        torch.set_default_dtype(previous)
    load_weights = getattr(model, "load_weights", None)
    if load_weights is None:
        raise TypeError(f"{cls.__name__} has no load_weights")
    layout = getattr(model, "layout", None) if tp is not None else None
    load_weights(iterate_weights(Path(model_dir), layout.shard if layout is not None else None))
    model.requires_grad_(False)
    return model.eval()
