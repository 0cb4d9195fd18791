"""A step's runner output that may still be on its way back from the GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vserve.core.sched_output import ModelRunnerOutput


class PendingOutput:
    """One step's ``ModelRunnerOutput``; ``result()`` waits for it (call it any number of
    times).

    ``chainable``: the engine may build and launch the next step before calling
    ``result()`` (async scheduling): that step can take its input tokens without waiting
    (on CUDA they stay in ``last_tokens`` on the device; a step already complete gives them
    from its result) and sampling does not read the output history.
    """

    __slots__ = ("_output", "_host", "_event", "_on_done", "device_request_ids", "chainable")

    def __init__(self, output: ModelRunnerOutput | None = None, *, chainable: bool = False,
                 device_request_ids: list[str] | None = None, host: torch.Tensor | None = None,
                 event: torch.cuda.Event | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        self._output = output
        self._host = host
        self._event = event
        self._on_done = on_done
        self.device_request_ids = device_request_ids
        self.chainable = chainable

    @classmethod
    def on_device(cls, request_ids: list[str], host: torch.Tensor, event: torch.cuda.Event,
                  on_done: Callable[[], None], chainable: bool = True) -> PendingOutput:
        """Greedy tokens being copied into the pinned ``host`` (one per row, in order of
        ``request_ids``), complete once ``event`` is; ``on_done`` runs after the wait."""
        return cls(None, chainable=chainable, device_request_ids=request_ids, host=host,
                   event=event, on_done=on_done)

    @property
    def ready(self) -> bool:
        """The output is on the host already (``result()`` will not wait)."""
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            assert self._event is not None and self._host is not None
            assert self.device_request_ids is not None
            self._event.synchronize()
            out = ModelRunnerOutput()
            out.sampled_token_ids = dict(zip(self.device_request_ids, self._host.tolist(),
                                             strict=True))
            if self._on_done is not None:
                self._on_done()
            self._output = out
            self._host = None
        return self._output
