"""Benchmark mode (``--benchmark-skip-compute``): steps without the model, so that only the
host's work is measured — the front end's, or the engine's own (``benchmarks/engine_host.py``).

A plain row gets a deterministic token, after the sampler's host work for it (keys,
temperatures, filters staged as for a draw on the device). A row under a grammar gets a
token its real bitmask allows: the step is deferred and its masks are filled exactly as a
real step's (in the background, once the step before is applied), so constrained decoding
costs the host what it costs with a model. With ``--benchmark-step-ms`` each step also holds
a simulated device for that long (``SimulatedDevice``), so that what the host does not
overlap with the device shows in the throughput, as it would on a GPU.
"""

from __future__ import annotations

import time

from vserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vserve.protocol.outputs import Logprobs
from vserve.structured.matcher import allowed_token
from vserve.worker.pending import PendingOutput
from vserve.worker.sampler import Sampler, SamplingInputs


class ReadyAt:
    """A simulated device event: complete at ``deadline`` (``time.perf_counter()``)."""

    __slots__ = ("deadline",)

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def query(self) -> bool:
        return time.perf_counter() >= self.deadline

    def synchronize(self) -> None:
        """Block as a host thread waiting for the device would (sleeping, so that the
        host's other threads get the core)."""
        left = self.deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)


class SimulatedDevice:
    """One stream of a simulated device (``--benchmark-step-ms``): work runs in launch
    order, each forward pass for ``step_s`` seconds whatever its shape, so a host that
    launches the next step before the last one ends keeps it busy, as on a GPU."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._free_at = 0.0

    def launch(self, seconds: float) -> ReadyAt:
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + seconds
        return ReadyAt(self._free_at)


def fake_step(sched: SchedulerOutput, vocab_size: int, sampler: Sampler,
              device: SimulatedDevice | None = None) -> PendingOutput:
    """The step's fake output. The sampler's host work is done as on the GPU: its inputs
    staged for a step that is not plain greedy, and deferred (``PendingOutput.deferred``)
    when sampling reads the output history (a grammar's token depends on the step before).
    With ``device``, the forward pass holds it for a step and the tokens are ready only
    after it — and for a deferred step, after its sampling, queued once it is launched."""
    out = fake_tokens(sched, vocab_size)
    forward = device.launch(device.step_s) if device is not None else None
    sampling = [s.request for s in sched.scheduled if s.sample]
    if not sampling or Sampler.plain_greedy(sampling):
        return PendingOutput(out, chainable=True, event=forward)
    if Sampler.history_free(sampling):
        sampler.prepare(sampling, vocab_size)
        return PendingOutput(out, chainable=True, event=forward)
    prepared: list[SamplingInputs] = []

    def prepare() -> None:
        prepared.append(sampler.prepare(sampling, vocab_size, background=True))

    def launch() -> PendingOutput:
        inputs = prepared[0] if prepared else sampler.prepare(sampling, vocab_size)
        if inputs.filling is not None:
            inputs.filling.result()
        # The draw itself takes no simulated time: it follows the forward pass.
        drawn = device.launch(0.0) if device is not None else None
        if not inputs.grammar_rows:  # every grammar completed while this step was in flight
            return PendingOutput(out, chainable=True, event=drawn)
        masks, keys = inputs.host_masks, inputs.host_keys
        assert masks is not None and keys is not None
        for row, i in enumerate(inputs.grammar_rows):
            req = sampling[i]
            # The row's noise key (a seed's n-th draw, else random): varied over rows and
            # steps as a random model's tokens are, and reproducible under a seed.
            token = allowed_token(masks[row], int(keys[i]) >> 1 & 0x7FFF_FFFF_FFFF)
            if token is not None:
                out.sampled_token_ids[req.request_id] = token
        return PendingOutput(out, chainable=True, event=drawn)

    return PendingOutput.deferred(launch, prepare)


def fake_tokens(sched: SchedulerOutput, vocab_size: int) -> ModelRunnerOutput:
    """A deterministic token per sampling request, never an EOS or special id below 32, and
    logprob rows of 0.0 where asked, with no arithmetic."""
    out = ModelRunnerOutput()
    sampled = out.sampled_token_ids
    top = vocab_size - 1
    for s in sched.scheduled:
        if not s.sample:
            continue
        req = s.request
        # The position after the row's last one: the length the sequence will have.
        n = req.num_computed_tokens + s.num_ahead + s.num_new_tokens
        tok = 32 + (n * 7) % 64
        if tok > top:
            tok = top
        while tok in req.eos_token_ids and tok > 0:
            tok -= 1
        sampled[req.request_id] = tok
        if req.wants_logprobs:
            k = req.sampling_params.logprobs or 0
            out.logprobs[req.request_id] = Logprobs([[tok] * (k + 1)], [[0.0] * (k + 1)], [1])
    return out
