"""The KV cache's dtype side by side: the model's own (``auto``) against float8 (``fp8``).

For each dtype, in alternating rounds (so that drift of the machine hits both alike): an
offline ``LLM`` generating ``--prompts`` greedy completions of ``--tokens`` tokens from
``--prompt-len``-token prompts, all submitted together; output tokens/s, the KV blocks the
same memory budget holds, and whether the greedy tokens agree with ``auto``'s.

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
    agree: list[float] = []
    for _ in range(args.rounds):
        ref = None
        for kv in ("auto", "fp8"):
            r = run(args.model, kv, prompts, args.tokens)
            rates[kv].append(r["tokens_per_s"])
            blocks[kv] = r["kv_blocks"]
            print(f"{kv:4}: {r['tokens_per_s']:8.0f} output tokens/s, {r['kv_blocks']} KV "
                  "blocks", flush=True)
            if ref is None:
                ref = r["ids"]
            else:
                same = sum(a == b for x, y in zip(ref, r["ids"]) for a, b in zip(x, y))
                agree.append(same / sum(map(len, ref)))
    summary = {kv: {"tokens_per_s_median": statistics.median(v), "kv_blocks": blocks[kv]}
               for kv, v in rates.items()}
    summary["fp8_over_auto"] = (summary["fp8"]["tokens_per_s_median"]
                                / summary["auto"]["tokens_per_s_median"])
    summary["greedy_positions_agreeing"] = statistics.median(agree)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
