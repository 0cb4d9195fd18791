"""Driving an in-process ``EngineCore`` in tests: greedy requests to completion."""

from __future__ import annotations

import random
import time
from typing import Any


def greedy_generate(core: Any, prompts: list[list[int]], max_tokens: int,
                    logprobs: int | None = None) -> tuple[list[list[int]], list[list[Any]]]:
    """Add ``prompts`` as greedy requests (``ignore_eos``), step ``core`` until all finish;
    returns each request's tokens and its per-step ``Logprobs`` (when asked for)."""
    from vserve.protocol.requests import EngineCoreRequest
    from vserve.protocol.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=logprobs)
    ids = []
    for p in prompts:
        rid = f"r{random.random()}"
        ids.append(rid)
        assert core.add_request(EngineCoreRequest(rid, p, params, [], time.time())) is None
    tokens: dict[str, list[int]] = {r: [] for r in ids}
    lps: dict[str, list[Any]] = {r: [] for r in ids}
    while core.has_unfinished_requests():
        for outs in core.step().values():
            for o in outs.unpack():
                tokens[o.request_id].extend(o.new_token_ids)
                if o.new_logprobs is not None:
                    lps[o.request_id].append(o.new_logprobs)
    return [tokens[r] for r in ids], [lps[r] for r in ids]
