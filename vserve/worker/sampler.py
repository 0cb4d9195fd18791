"""Sampling: penalties, logit bias, min_tokens, temperature, top-k/top-p/min-p, seeds, logprobs.

Works on a ``[batch, vocab]`` float32 logits tensor on any device. Logprobs are those of the
model's raw distribution (before penalties and temperature), as vLLM returns by default.

Sampling is the Gumbel-max trick over counter-based noise (``vserve.worker.gumbel``): a
seeded request's n-th token uses the key ``seeded_key(seed, n)``, so the same seed gives the
same output whatever the batch holds; the whole batch is one noise-and-argmax launch on CUDA.

Hot path: every decision about which stages run is made on the host from the requests'
parameters (no device→host reads); a batch of plain greedy requests is one ``argmax`` and
one copy of the token ids to the host, and the logits are cloned only when a penalty, bias
or ``min_tokens`` ban will modify them. Rows without top-k/top-p/min-p need no softmax.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from vserve.core.request import Request
from vserve.protocol.outputs import Logprobs
from vserve.structured.matcher import bitmask_width, fill_bitmask, fill_bitmask_async
from vserve.worker.gumbel import (
    banned_tokens,
    gumbel_argmax,
    seeded_key,
    seeded_keys,
    to_int64,
)
from vserve.worker.staging import Staging

_M64 = 0xFFFF_FFFF_FFFF_FFFF
# Up to this many masks are filled in the caller's thread even when asked for in the
# background: handing the fill to the grammar thread costs ~0.1 ms on the 2-core machine,
# a mask ~8 us (128k vocabulary; measured).
_BACKGROUND_MIN_ROWS = 8


@dataclass
class SamplerOutput:
    sampled: list[int]
    logprobs: list[Logprobs | None]  # per row: one-row Logprobs when the request asked


class Sampler:
    """Stateless but for the engine's own random stream for unseeded rows (a seeded
    request counts its own draws: ``Request.num_draws``)."""

    def __init__(self, device: torch.device, base_seed: int = 0) -> None:
        self.device = device
        self._unseeded = np.random.PCG64(base_seed)
        self._staging = Staging(device)

    def _keys(self, requests: list[Request], out: np.ndarray) -> None:
        """``out`` (int64 ``[B]``) ← the noise key of each request's next sampled token;
        advances the seeded requests' draw counts. A greedy row's key is never read."""
        n = len(requests)
        if n <= 8:  # Python integers beat numpy's per-call cost here
            for i, r in enumerate(requests):
                if r.seed is None:
                    out[i] = to_int64(self._unseeded.random_raw())
                else:
                    out[i] = seeded_key(r.seed, r.num_draws)
                    r.num_draws += 1
            return
        out[:] = self._unseeded.random_raw(n).view(np.int64)
        rows, seeds, draws = [], [], []
        for i, r in enumerate(requests):
            if r.seed is not None:
                rows.append(i)
                seeds.append(r.seed & _M64)
                draws.append(r.num_draws)
                r.num_draws += 1
        if rows:
            out[rows] = seeded_keys(np.array(seeds, np.uint64), np.array(draws, np.uint64))

    @staticmethod
    def plain_greedy(requests: list[Request]) -> bool:
        """Whether every request's token is the argmax of its raw logits (greedy, no
        penalty/bias/min_tokens ban, no logprobs): then a precomputed argmax will do."""
        return all(r.plain_greedy and r.grammar is None for r in requests) or all(
            r.temperature == 0.0 and not r.wants_logprobs and not _constrained(r)
            for r in requests)

    @staticmethod
    def history_free(requests: list[Request]) -> bool:
        """Whether no request's sampling reads its output so far (grammars, penalties, a
        pending ``min_tokens`` ban): then a step may sample before the previous token is
        known to the host; otherwise its sampling is deferred (``PendingOutput.deferred``).
        Stays true for later steps of the same requests."""
        return all(r.history_free and r.grammar is None for r in requests) or not any(
            _constrained(r) for r in requests)

    @staticmethod
    def host_free(requests: list[Request]) -> bool:
        """Whether no request wants logprobs: its tokens can then stay on the device
        (``sample_on_device``) and be read back like greedy ones."""
        return not any(r.wants_logprobs for r in requests)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(requests)
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = (torch.log_softmax(logits.float(), dim=-1) if any(want_logprobs)
                        else None)
        sampled = self.sample_on_device(logits, requests)
        sampled_list = sampled.tolist()

        logprob_rows: list[Logprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprob_rows = _gather_logprobs(raw_logprobs, sampled.long(),
                                            [p.logprobs for p in params])
        return SamplerOutput(sampled=sampled_list, logprobs=logprob_rows)

    def prepare(self, requests: list[Request], vocab: int, background: bool = False
                ) -> SamplingInputs:
        """The host side of ``sample_on_device``: per-row keys, temperatures, filters and
        grammar bitmasks written into the staging buffer. Reads the requests' state (grammar
        matchers, draw counts) as of this call and advances the seeded rows' draw counts, so
        the result must be sampled with exactly once. ``background``: fill the bitmasks on
        the grammar thread (off the GIL) while the caller goes on (above a few rows); until
        ``sample_on_device`` has run, nothing may advance these requests' grammars or
        stage other inputs."""
        n = len(requests)
        # A stopped grammar belongs to a request that finished while this (chained) row was
        # in flight: its token is dropped, and a stopped matcher has no mask to give.
        grammar_rows = [i for i, r in enumerate(requests)
                        if r.grammar is not None and not r.grammar.is_stopped()]
        temps = [r.temperature for r in requests]
        filters = [r.filters for r in requests]
        flags = 0
        for f in set(filters):
            flags |= f
        inputs = SamplingInputs(
            grammar_rows,
            not all(r.history_free for r in requests) and any(_modifies(r) for r in requests),
            not any(temps),
            bool(flags & 1) and any(0 < r.sampling_params.top_k < vocab for r in requests),
            bool(flags & 2), bool(flags & 4))
        if inputs.plain_greedy:
            return inputs
        specs: list[tuple[type, tuple[int, ...]]] = [(np.int64, (n,)), (np.float32, (n,))]
        if grammar_rows:
            r = len(grammar_rows)
            specs += [(np.int32, (r, bitmask_width(vocab))), (np.int32, (n,)), (np.int64, (r,))]
        if inputs.filtered:
            specs.append((np.float32, (3, n)))
        host = self._staging.stage(*specs)
        self._keys(requests, host[0])
        inputs.host_keys = host[0]
        host[1][:] = temps
        if grammar_rows:
            matchers = [requests[i].grammar for i in grammar_rows]
            inputs.host_masks = host[2]
            if background and len(matchers) > _BACKGROUND_MIN_ROWS:
                inputs.filling = fill_bitmask_async(matchers, host[2])
            else:
                fill_bitmask(matchers, host[2])
            host[3][:] = -1
            host[3][grammar_rows] = np.arange(len(grammar_rows), dtype=np.int32)
            host[4][:] = grammar_rows
        if inputs.filtered:
            params = [r.sampling_params for r in requests]
            host[-1][0] = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
            host[-1][1] = [p.top_p for p in params]
            host[-1][2] = [p.min_p for p in params]
        return inputs

    def sample_on_device(self, logits: torch.Tensor, requests: list[Request],
                         inputs: SamplingInputs | None = None) -> torch.Tensor:
        """int32 ``[B]`` tokens on ``logits``' device, drawn without waiting for the device:
        every per-row input goes up in one non-blocking copy. ``inputs``: from ``prepare``
        for the same requests, else prepared now."""
        vocab = logits.shape[1]
        if inputs is None:
            inputs = self.prepare(requests, vocab)
        if inputs.plain_greedy:
            return _argmax(logits).to(torch.int32)
        if inputs.filling is not None:
            inputs.filling.result()
        dev = self._staging.upload()
        keys, temps = dev[0], dev[1]
        grammar = bool(inputs.grammar_rows)
        x = logits
        if inputs.modified:
            x = _apply_penalties(logits.to(torch.float32, copy=True), requests)
        if not inputs.filtered:
            # argmax(x / T + Gumbel) draws from softmax(x / T): no softmax needed; greedy
            # rows (T = 0) and the grammar masks are in the same launch.
            masks = (dev[2], dev[3]) if grammar else None
            return gumbel_argmax(x, temps, keys, masks).to(torch.int32)
        if grammar:
            # The grammar's mask comes before the filters (top-p is over allowed tokens).
            x = x if inputs.modified else logits.to(torch.float32, copy=True)
            index = dev[4]
            x[index] = x[index].masked_fill(banned_tokens(dev[2], vocab), float("-inf"))
        greedy = temps == 0
        unit = torch.where(greedy, 1.0, temps).unsqueeze(1)
        table = dev[-1]
        scores = _filtered_probs(x.float() / unit, table[0], table[1], table[2],
                                 inputs.any_top_k, inputs.any_top_p, inputs.any_min_p).log()
        drawn = gumbel_argmax(scores, (~greedy).float(), keys)
        # A greedy row's filtered log-probabilities may round near-ties differently from
        # its logits: its token stays the plain argmax.
        return torch.where(greedy, _argmax(x), drawn).to(torch.int32)


@dataclass
class SamplingInputs:
    """What ``Sampler.prepare`` staged for one step's sampling rows."""

    grammar_rows: list[int]  # rows whose (unstopped) grammar masks them
    modified: bool  # a penalty, bias or min_tokens ban changes some row
    greedy: bool  # every row is greedy
    any_top_k: bool  # some row filters with top-k, top-p, min-p
    any_top_p: bool
    any_min_p: bool
    filling: Future[None] | None = None  # the bitmask fill, when in the background
    # int32 [len(grammar_rows), bitmask words]: the staged masks on the host (complete once
    # ``filling`` is), valid until the next ``prepare``.
    host_masks: np.ndarray | None = None
    host_keys: np.ndarray | None = None  # int64 [rows]: each row's noise key, likewise

    @property
    def filtered(self) -> bool:
        return self.any_top_k or self.any_top_p or self.any_min_p

    @property
    def plain_greedy(self) -> bool:
        return self.greedy and not self.grammar_rows and not self.modified


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Logit bias, a pending ``min_tokens`` ban and the repetition/presence/frequency
    penalties, in place on a float32 copy of the logits (row by row: these are rare)."""
    vocab = logits.shape[1]
    dev = logits.device
    for i, req in enumerate(requests):
        p = req.sampling_params
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                bias = _to(torch.tensor([p.logit_bias[t] for t in ids]), dev)
                logits[i, _to(torch.tensor(ids), dev)] += bias
        if req.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned |= req.eos_token_ids
            ids = [t for t in banned if t < vocab]
            if ids:
                logits[i, _to(torch.tensor(ids), dev)] = float("-inf")
        if p.repetition_penalty != 1.0 and req.all_token_ids:
            seen = _to(torch.tensor(sorted({t for t in req.all_token_ids if t < vocab})), dev)
            vals = logits[i, seen]
            pen = p.repetition_penalty
            logits[i, seen] = torch.where(vals > 0, vals / pen, vals * pen)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            out = _to(torch.tensor([t for t in req.output_token_ids if t < vocab]), dev)
            counts = torch.zeros(vocab, device=dev)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a stream sync (``torch.tensor(...,
    device="cuda")`` would wait for the forward pass still running)."""
    return t.to(device, non_blocking=True) if device.type == "cuda" else t


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.is_cuda:
        from vserve.ops import use_kernels

        if use_kernels(logits):
            from vserve.ops.sampling import argmax

            return argmax(logits)
    return logits.argmax(dim=-1)


def _constrained(req: Request) -> bool:
    """Whether a grammar or ``_apply_penalties`` constrains this request's row."""
    return req.grammar is not None or _modifies(req)


def _modifies(req: Request) -> bool:
    """Whether ``_apply_penalties`` would change this request's row."""
    return req.penalized or len(req.output_token_ids) < req.min_tokens


def _filtered_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor, any_k: bool, any_p: bool, any_min_p: bool
                    ) -> torch.Tensor:
    """Softmax after top-k, top-p and min-p (per-row float32 ``[B]`` on the device; a
    top-k of the vocabulary size, a top-p of 1 and a min-p of 0 filter nothing). The
    ``any_*`` flags, known on the host, skip the stages no row uses."""
    vocab = logits.shape[1]
    if any_k or any_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each rank
        sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any_min_p:
        keep = probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int | None]
) -> list[Logprobs | None]:
    """One-row Logprobs per row that asked: the given token first, then its top-k."""
    k_max = max((k for k in num_top if k is not None), default=0)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    top_vals, top_ids = (
        logprobs.topk(k_max, dim=-1) if k_max > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    )
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    ids_l, tok_l, vals_l = top_ids.tolist(), token_ids.tolist(), top_vals.tolist()
    rows: list[Logprobs | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            rows.append(None)
            continue
        rows.append(
            Logprobs(
                token_ids=[[tok_l[i], *ids_l[i][:k]]],
                logprobs=[[chosen_l[i], *vals_l[i][:k]]],
                ranks=[ranks_l[i]],
            )
        )
    return rows


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> Logprobs:
    """Logprobs for many positions of one request (prompt logprobs), stacked in one struct."""
    rows = _gather_logprobs(logprobs, token_ids, [num_top] * logprobs.shape[0])
    out = Logprobs(token_ids=[], logprobs=[], ranks=[])
    for r in rows:
        assert r is not None
        out.token_ids.extend(r.token_ids)
        out.logprobs.extend(r.logprobs)
        out.ranks.extend(r.ranks)
    return out
