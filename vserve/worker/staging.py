"""Small per-step host arrays (sampling parameters, noise keys, grammar bitmasks) moved to the
device in one copy that never waits for the GPU.

``torch.tensor(data, device="cuda")`` synchronizes the stream: on a step whose forward pass is
still running it would wait for that pass, which is exactly what sampling on the device is
meant to avoid. Here the arrays are written into a pinned host buffer and copied with one
non-blocking copy into a device buffer whose slices are handed out.

Invariants: two pinned buffers and two device buffers are used in turn; a pinned buffer is
rewritten only once the event recorded after the copy that last read it has completed (it
normally has: the step before has been read back by then). A device slice stays valid for
kernels enqueued before the next-but-one ``upload``. On CPU the arrays are used in place.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_ALIGN = 16  # bytes: every array starts aligned for any dtype


class Staging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._capacity = 0
        self._host: list[torch.Tensor] = []
        self._dev: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event] = []
        self._next = 0
        self._layout: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        self._views: list[np.ndarray] = []
        self._used = 0

    def stage(self, *specs: tuple[type | np.dtype, tuple[int, ...]]) -> list[np.ndarray]:
        """Host arrays of the given ``(dtype, shape)`` to fill, then ``upload()``."""
        layout, offset = [], 0
        for dtype, shape in specs:
            dt = np.dtype(dtype)
            layout.append((offset, dt, shape))
            nbytes = math.prod(shape) * dt.itemsize
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._layout = layout
        if not self._cuda:
            self._views = [np.empty(shape, dtype=dt) for _, dt, shape in layout]
            return self._views
        if offset > self._capacity:
            self._grow(offset)
        i = self._next
        self._events[i].synchronize()
        raw = self._host[i].numpy()
        self._views = [raw[o:o + math.prod(s) * dt.itemsize].view(dt)
                       .reshape(s) for o, dt, s in layout]
        self._used = offset
        return self._views

    def upload(self) -> list[torch.Tensor]:
        """The staged arrays on the device (in ``stage``'s order), after one copy."""
        if not self._cuda:
            return [torch.from_numpy(v) for v in self._views]
        i = self._next
        self._next = 1 - i
        dev = self._dev[i]
        dev[: self._used].copy_(self._host[i][: self._used], non_blocking=True)
        self._events[i].record()
        out = []
        for (o, dt, s), v in zip(self._layout, self._views, strict=True):
            n = v.nbytes
            out.append(dev[o:o + n].view(_TORCH[dt]).view(s))
        return out

    def _grow(self, nbytes: int) -> None:
        if self._events:
            torch.cuda.current_stream().synchronize()  # the old buffers may still be read
        cap = max(nbytes, 2 * self._capacity, 1 << 16)
        self._host = [torch.empty(cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._dev = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        for ev in self._events:
            ev.record()
        self._capacity = cap


_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
          np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
