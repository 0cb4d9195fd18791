"""Triton kernels of the GPU path.

Imported only on CUDA (``vserve.ops.*`` imports ``triton``); the CPU path never touches this
package. ``available()`` says whether the kernels can be used in this process.

    attention.py   paged decode attention, varlen prefill attention over paged context,
                   RoPE + KV-cache write
    layernorm.py   RMSNorm and fused residual-add + RMSNorm
    activation.py  SiLU-and-multiply

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is how they
were first debugged without a GPU.
"""

from __future__ import annotations

import functools

from vserve import envs


@functools.cache
def available() -> bool:
    """Triton imports and either CUDA is there or the interpreter is on."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or envs.triton_interpret()


@functools.cache
def pdl() -> bool:
    """Launch the decode step's kernels with programmatic dependent launch (Hopper and
    newer): a kernel's blocks start while the previous kernel's last ones still run, load
    what does not depend on it (weights), then wait (``griddepcontrol.wait``) for its
    results. Every kernel launched this way waits before its first dependent load and its
    first store, so ordering stays transitive along the chain. ``VSERVE_PDL=0`` turns it
    off."""
    if not envs.pdl_enabled() or envs.triton_interpret():
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def use_kernels(t: object) -> bool:
    """Whether ``t`` (a tensor) should go through the Triton kernels: CUDA tensors only,
    or any tensor under ``TRITON_INTERPRET=1`` when ``VSERVE_TRITON_ON_CPU=1`` (tests of
    the kernels themselves on a machine without a GPU)."""
    if getattr(t, "is_cuda", False):
        return available()
    return _ON_CPU and available()


_ON_CPU = envs.triton_on_cpu()
