"""A step's runner output that may still be on its way back from the GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from vserve.core.sched_output import ModelRunnerOutput

if TYPE_CHECKING:
    from vserve.worker.fake_compute import ReadyAt


class PendingOutput:
    """One step's ``ModelRunnerOutput``; ``result()`` waits for it (call it any number of
    times).

    ``chainable``: the engine may build and launch the next step before calling
    ``result()`` (async scheduling): that step can take its input tokens without waiting
    (on CUDA they stay in ``last_tokens`` on the device; a step already complete gives them
    from its result).

    A step whose sampling reads the output history (grammars, penalties, a pending
    ``min_tokens``; on CUDA also any step with logprobs, whose sampling would otherwise
    wait for its forward pass before the engine applies the step before) is *deferred*:
    its forward pass is launched, its sampling waits in
    ``sample()`` until the engine has applied the step before it — so that the bitmasks and
    penalties see every earlier token — and the engine calls ``sample()`` before it chains
    the next step onto this one. The host's work for the step before (reading its tokens,
    advancing grammars, computing the next masks) then overlaps this step's forward pass.
    On CUDA a deferred step without logprobs samples on the device: ``sample()`` only
    queues the sampling and its read-back, and the step becomes one whose tokens are on the
    device (the next step chains onto it without waiting, as onto a greedy one).
    """

    __slots__ = ("_output", "_host", "_event", "_on_done", "_deferred", "_prepare",
                 "device_request_ids", "chainable")

    def __init__(self, output: ModelRunnerOutput | None = None, *, chainable: bool = False,
                 device_request_ids: list[str] | None = None, host: torch.Tensor | None = None,
                 event: torch.cuda.Event | ReadyAt | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        """``output`` with ``event``: an output known ahead that is complete only once the
        event is (a simulated device's step, ``vserve.worker.fake_compute``)."""
        self._output = output
        self._host = host
        self._event = event
        self._on_done = on_done
        self._deferred: Callable[[], ModelRunnerOutput | PendingOutput] | None = None
        self._prepare: Callable[[], None] | None = None
        self.device_request_ids = device_request_ids
        self.chainable = chainable

    @classmethod
    def on_device(cls, request_ids: list[str], host: torch.Tensor, event: torch.cuda.Event,
                  on_done: Callable[[], None], chainable: bool = True) -> PendingOutput:
        """Greedy tokens being copied into the pinned ``host`` (one per row, in order of
        ``request_ids``), complete once ``event`` is; ``on_done`` runs after the wait."""
        return cls(None, chainable=chainable, device_request_ids=request_ids, host=host,
                   event=event, on_done=on_done)

    @classmethod
    def deferred(cls, sample: Callable[[], ModelRunnerOutput | PendingOutput],
                 prepare: Callable[[], None] | None = None) -> PendingOutput:
        """A launched forward pass whose tokens ``sample`` draws once called (``sample()``):
        it reads the requests' state as of then, and returns the output, or an
        ``on_device`` pending output whose read-back it queued. Chainable once sampled.
        ``prepare``: the host work of ``sample`` that may start early (``prepare()``)."""
        out = cls(None, chainable=True)
        out._deferred = sample
        out._prepare = prepare
        return out

    def prepare(self) -> None:
        """Start a deferred step's host work for sampling (grammar bitmasks filled in the
        background) now; nothing for any other step. Call it once every earlier step's
        tokens are in the grammars (the rest of the step before may still be being applied:
        of the history, only the grammars are read here, and an output still one token
        short only makes a ``min_tokens`` row look pending — ``sample()`` checks again),
        and advance no grammar of this step until ``sample()``."""
        if self._prepare is not None and self._deferred is not None:
            prepare, self._prepare = self._prepare, None
            prepare()

    @property
    def is_deferred(self) -> bool:
        """Sampling has not run yet (see ``sample()``)."""
        return self._deferred is not None

    def sample(self) -> None:
        """Run a deferred step's sampling now; nothing for any other step. Call it once every
        earlier step's output has been applied to the requests."""
        if self._deferred is not None:
            sample, self._deferred = self._deferred, None
            out = sample()
            if isinstance(out, PendingOutput):
                self._output, self._host, self._event = out._output, out._host, out._event
                self._on_done, self.device_request_ids = out._on_done, out.device_request_ids
            else:
                self._output = out

    @property
    def ready(self) -> bool:
        """The output is on the host already (``result()`` will not wait)."""
        return self._output is not None and (self._event is None or self._event.query())

    def result(self) -> ModelRunnerOutput:
        self.sample()
        if self._output is not None:
            if self._event is not None:  # an output known ahead, complete with the event
                self._event.synchronize()
                self._event = None
        else:
            assert self._event is not None and self._host is not None
            assert self.device_request_ids is not None
            self._event.synchronize()
            out = ModelRunnerOutput()
            out.sampled_token_ids = dict(zip(self.device_request_ids, self._host.tolist(),
                                             strict=True))
            if self._on_done is not None:
                self._on_done()
            self._output = out
            self._host = self._event = None
        return self._output
