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

import random
from dataclasses import dataclass

import numpy as np
import torch

from vserve.core.request import Request
from vserve.protocol.outputs import Logprobs
from vserve.structured.matcher import bitmask_width, fill_bitmask
from vserve.worker.gumbel import gumbel_argmax, seeded_key, to_int64


@dataclass
class SamplerOutput:
    sampled: list[int]
    logprobs: list[Logprobs | None]  # per row: one-row Logprobs when the request asked


class Sampler:
    """Stateless but for how many tokens each seeded request has drawn, and the engine's own
    random stream for unseeded rows."""

    def __init__(self, device: torch.device, base_seed: int = 0) -> None:
        self.device = device
        self._draws: dict[str, int] = {}
        self._unseeded = random.Random(base_seed)

    def forget(self, request_ids: set[str] | list[str]) -> None:
        for rid in request_ids:
            self._draws.pop(rid, None)

    def _key(self, request: Request) -> int:
        """The noise key of this request's next sampled token (advances its draw count)."""
        seed = request.sampling_params.seed
        if seed is None:
            return to_int64(self._unseeded.getrandbits(64))
        draw = self._draws.get(request.request_id, 0)
        self._draws[request.request_id] = draw + 1
        return seeded_key(seed, draw)

    @staticmethod
    def plain_greedy(requests: list[Request]) -> bool:
        """Whether every request's token is the argmax of its raw logits (greedy, no
        penalty/bias/min_tokens ban, no logprobs): then a precomputed argmax will do."""
        return all(r.sampling_params.greedy and r.sampling_params.logprobs is None
                   and not _constrained(r) for r in requests)

    @staticmethod
    def history_free(requests: list[Request]) -> bool:
        """Whether no request's sampling reads its output so far (grammars, penalties, a
        pending ``min_tokens`` ban): then a step may sample before the previous token is
        known to the host; otherwise its sampling is deferred (``PendingOutput.deferred``;
        on CUDA every step sampled on the host is).
        Stays true for later steps of the same requests."""
        return not any(_constrained(r) for r in requests)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(requests)
        logits = logits.float()
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(_constrained(r) for r in requests):
            logits = self._apply_constraints(logits.clone(), requests)
        sampled = self._sample(logits, requests)
        sampled_list = sampled.tolist()

        logprob_rows: list[Logprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            logprob_rows = _gather_logprobs(raw_logprobs, sampled, [p.logprobs for p in params])
        return SamplerOutput(sampled=sampled_list, logprobs=logprob_rows)

    def _apply_constraints(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        vocab = logits.shape[1]
        # A stopped grammar belongs to a request that finished while this (chained) row was
        # in flight: its token is dropped, and a stopped matcher has no mask to give.
        rows = [i for i, r in enumerate(requests)
                if r.grammar is not None and not r.grammar.is_stopped()]
        if rows:
            apply_grammar_bitmask(logits, rows, [requests[i].grammar for i in rows])
        for i, req in enumerate(requests):
            p = req.sampling_params
            if p.logit_bias:
                ids = [t for t in p.logit_bias if t < vocab]
                if ids:
                    bias = torch.tensor([p.logit_bias[t] for t in ids], device=logits.device)
                    logits[i, ids] += bias
            if req.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    banned |= req.eos_token_ids
                ids = [t for t in banned if t < vocab]
                if ids:
                    logits[i, ids] = float("-inf")
            if p.repetition_penalty != 1.0 and req.all_token_ids:
                seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device)
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                pen = p.repetition_penalty
                logits[i, seen] = torch.where(vals > 0, vals / pen, vals * pen)
            if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
                out = torch.tensor(req.output_token_ids, device=logits.device)
                out = out[out < vocab]
                counts = torch.zeros(vocab, device=logits.device)
                counts.scatter_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        greedy_list = [p.greedy for p in params]
        if all(greedy_list):
            return _argmax(logits)
        dev = logits.device
        keys = torch.tensor([0 if p.greedy else self._key(r) for p, r in zip(params, requests)],
                            dtype=torch.int64).to(dev, non_blocking=True)
        temps = torch.tensor([0.0 if p.greedy else p.temperature for p in params],
                             dtype=torch.float32).to(dev, non_blocking=True)
        if not _filtered(params, logits.shape[1]):
            # argmax(x / T + Gumbel) draws from softmax(x / T): no softmax needed, and
            # greedy rows (T = 0) take the plain argmax in the same launch.
            return gumbel_argmax(logits, temps, keys)
        unit = torch.where(temps > 0, temps, 1.0)
        scores = _filtered_probs(logits / unit.unsqueeze(1), params).log()
        drawn = gumbel_argmax(scores, torch.where(temps > 0, 1.0, 0.0), keys)
        if not any(greedy_list):
            return drawn
        # A greedy row's filtered log-probabilities may round near-ties differently from its
        # raw logits: its token stays the raw argmax.
        greedy = torch.tensor(greedy_list).to(dev, non_blocking=True)
        return torch.where(greedy, _argmax(logits), drawn)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.is_cuda:
        from vserve.ops import use_kernels

        if use_kernels(logits):
            from vserve.ops.sampling import argmax

            return argmax(logits)
    return logits.argmax(dim=-1)


def apply_grammar_bitmask(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set to -inf, in ``logits[rows]``, every token the rows' grammars do not allow next.

    The bitmask is computed on the host (llguidance). On CUDA it goes up as bits (4 bytes
    per 32 tokens) and is expanded on the device; on CPU it is unpacked with numpy."""
    vocab = logits.shape[1]
    width = bitmask_width(vocab)
    host = np.empty((len(rows), width), dtype=np.int32)
    fill_bitmask(matchers, host)
    if logits.is_cuda:
        words = torch.from_numpy(host).to(logits.device, non_blocking=True)
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        banned = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), width * 32)[:, :vocab] == 0
    else:
        bits = np.unpackbits(host.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        banned = torch.from_numpy(bits == 0)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(banned, float("-inf"))


def _constrained(req: Request) -> bool:
    """Whether ``_apply_constraints`` would change this request's row."""
    p = req.sampling_params
    return bool(
        req.grammar is not None
        or p.logit_bias
        or req.num_output_tokens < p.min_tokens
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


def _filtered(params: list, vocab: int) -> bool:
    """Whether any row has a top-k, top-p or min-p filter."""
    return any((0 < p.top_k < vocab) or p.top_p < 1.0 or p.min_p > 0.0 for p in params)


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Softmax after top-k, top-p and min-p; rows without filters skip the sort."""
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if any(top_k) or any(tp < 1.0 for tp in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.tensor([k or vocab for k in top_k], device=logits.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each rank
        tp = torch.tensor(top_p, device=logits.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(before >= tp, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any(mp > 0.0 for mp in min_p):
        mp = torch.tensor(min_p, device=logits.device).unsqueeze(1)
        keep = probs >= mp * probs.max(dim=-1, keepdim=True).values
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
