"""The KV cache's dtype side by side: the model's own (``auto``) against float8 (``fp8``).

For each dtype, in alternating rounds (so that drift of the machine hits both alike): an
offline ``LLM`` generating ``--prompts`` greedy completions of ``--tokens`` tokens from
``--prompt-len``-token prompts, all submitted together; output tokens/s and the KV blocks the
same memory budget holds. Then the quality, teacher-forced (free-running greedy paths part
at the first near-tie, which says little): ``auto``'s completions scored as prompts under
each cache (``prompt_logprobs``), giving the mean and largest difference of the logprobs of
the same tokens and how often each token is still the cache's top choice.

    python benchmarks/kv_cache_dtype.py --rounds 2                 # the demo model, CPU
    python benchmarks/kv_cache_dtype.py --model DIR --prompts 256   # any model, CUDA if present

On the CPU the budget is ``--kv-cache-memory`` (default 1 GiB); on CUDA what memory
profiling leaves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def run(model: str, kv: str, prompts: list[list[int]], tokens: int) -> dict:
    from vserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with LLM(model, kv_cache_dtype=kv) as llm:  # type: ignore[arg-type]
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4),
                     use_tqdm=False)  # warm-up: first-step compilation, allocations
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        blocks = llm.num_kv_blocks
    ids = [o.outputs[0].token_ids for o in outs]
    return {"tokens_per_s": sum(map(len, ids)) / seconds, "kv_blocks": blocks, "ids": ids}


def teacher_forced(model: str, kv: str, sequences: list[list[int]],
                   start: int) -> list[tuple[float, int | None]]:
    """(logprob, rank) of every token of ``sequences`` from position ``start`` on, each
    scored given the tokens before it, under a ``kv`` cache."""
    from vserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    with LLM(model, kv_cache_dtype=kv) as llm:  # type: ignore[arg-type]
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params,
                            use_tqdm=False)
    scored = []
    for out, seq in zip(outs, sequences):
        assert out.prompt_logprobs is not None
        for pos in range(start, len(seq)):
            entry = out.prompt_logprobs[pos]
            assert entry is not None
            scored.append((entry[seq[pos]].logprob, entry[seq[pos]].rank))
    return scored


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the summary here (JSON)")
    args = p.parse_args()
    prompts = [[5 + (i * 7 + j) % 250 for j in range(args.prompt_len)]
               for i in range(args.prompts)]
    rates: dict[str, list[float]] = {"auto": [], "fp8": []}
    blocks: dict[str, int] = {}
    completions: list[list[int]] = []
    for _ in range(args.rounds):
        for kv in ("auto", "fp8"):
            r = run(args.model, kv, prompts, args.tokens)
            rates[kv].append(r["tokens_per_s"])
            blocks[kv] = r["kv_blocks"]
            if kv == "auto":
                completions = r["ids"]
            print(f"{kv:4}: {r['tokens_per_s']:8.0f} output tokens/s, {r['kv_blocks']} KV "
                  "blocks", flush=True)
    summary: dict[str, Any] = {
        kv: {"tokens_per_s_median": statistics.median(v), "kv_blocks": blocks[kv]}
        for kv, v in rates.items()}
    summary["fp8_over_auto"] = (summary["fp8"]["tokens_per_s_median"]
                                / summary["auto"]["tokens_per_s_median"])
    sequences = [p + c for p, c in zip(prompts, completions)]
    scored = {kv: teacher_forced(args.model, kv, sequences, args.prompt_len)
              for kv in ("auto", "fp8")}
    diffs = [abs(a[0] - b[0]) for a, b in zip(scored["auto"], scored["fp8"])]
    summary["teacher_forced"] = {
        "tokens": len(diffs),
        "logprob_abs_diff_mean": statistics.fmean(diffs),
        "logprob_abs_diff_max": max(diffs),
        # auto's own greedy tokens: its top choice, but for exact ties.
        "top1_auto": sum(r == 1 for _, r in scored["auto"]) / len(diffs),
        "top1_fp8": sum(r == 1 for _, r in scored["fp8"]) / len(diffs),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
