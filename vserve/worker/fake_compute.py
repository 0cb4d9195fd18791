"""Benchmark mode (``--benchmark-skip-compute``): steps without the model, so that only the
host's work is measured — the front end's, or the engine's own (``benchmarks/engine_host.py``).

A plain row gets a deterministic token, after the sampler's host work for it (keys,
temperatures, filters staged as for a draw on the device). A row under a grammar gets a
token its real bitmask allows: the step is deferred and its masks are filled exactly as a
real step's (in the background, once the step before is applied), so constrained decoding
costs the host what it costs with a model.
"""

from __future__ import annotations

from vserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vserve.protocol.outputs import Logprobs
from vserve.structured.matcher import allowed_token
from vserve.worker.pending import PendingOutput
from vserve.worker.sampler import Sampler, SamplingInputs


def fake_step(sched: SchedulerOutput, vocab_size: int, sampler: Sampler) -> PendingOutput:
    """The step's fake output. The sampler's host work is done as on the GPU: its inputs
    staged for a step that is not plain greedy, and deferred (``PendingOutput.deferred``)
    when sampling reads the output history (a grammar's token depends on the step before)."""
    out = fake_tokens(sched, vocab_size)
    sampling = [s.request for s in sched.scheduled if s.sample]
    if not sampling or Sampler.plain_greedy(sampling):
        return PendingOutput(out, chainable=True)
    if Sampler.history_free(sampling):
        sampler.prepare(sampling, vocab_size)
        return PendingOutput(out, chainable=True)
    prepared: list[SamplingInputs] = []

    def prepare() -> None:
        prepared.append(sampler.prepare(sampling, vocab_size, background=True))

    def launch() -> ModelRunnerOutput:
        inputs = prepared[0] if prepared else sampler.prepare(sampling, vocab_size)
        if inputs.filling is not None:
            inputs.filling.result()
        if not inputs.grammar_rows:  # every grammar completed while this step was in flight
            return out
        masks, keys = inputs.host_masks, inputs.host_keys
        assert masks is not None and keys is not None
        for row, i in enumerate(inputs.grammar_rows):
            req = sampling[i]
            # The row's noise key (a seed's n-th draw, else random): varied over rows and
            # steps as a random model's tokens are, and reproducible under a seed.
            token = allowed_token(masks[row], int(keys[i]) >> 1 & 0x7FFF_FFFF_FFFF)
            if token is not None:
                out.sampled_token_ids[req.request_id] = token
        return out

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
