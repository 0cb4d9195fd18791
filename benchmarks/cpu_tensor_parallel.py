"""Tensor parallel on CPU: the same model at TP=1 and TP=2 (gloo), side by side in one run.

A Llama-shaped model with random weights is written locally (8 layers, hidden 1024, 16 heads
/ 8 KV heads, intermediate 4096, vocabulary 32,000: ~0.2B parameters, float32), then
``LLM(..., tensor_parallel_size=T)`` decodes ``--tokens`` greedy tokens for a batch of 1 and
of ``--batch`` prompts. Reports output tokens/s per configuration, the TP=2 / TP=1 ratio, and
whether the greedy tokens agree. Nothing is downloaded.

    python benchmarks/cpu_tensor_parallel.py --tokens 64 --batch 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vserve-tp-bench-"))
    try:
        result = run(workdir, args.tokens, args.batch)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def run(workdir: Path, num_tokens: int, max_batch: int) -> dict[str, Any]:
    from helpers.models import make_tiny_model

    from vserve import LLM, SamplingParams

    model_dir = make_tiny_model(
        workdir / "m", "llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8)
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    result: dict[str, Any] = {"tokens": num_tokens}
    tokens: dict[int, list[list[int]]] = {}
    for tp in (1, 2):
        with LLM(str(model_dir), dtype="float32", tensor_parallel_size=tp,
                 max_model_len=512) as llm:
            llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=4),
                         use_tqdm=False)  # warm-up
            for batch in (1, max_batch):
                prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(batch)]
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                took = time.perf_counter() - t0
                result[f"tp{tp}_batch{batch}_tok_s"] = round(batch * num_tokens / took, 1)
                tokens.setdefault(tp, []).extend(o.outputs[0].token_ids for o in outs)
    for batch in (1, max_batch):
        result[f"tp2_over_tp1_batch{batch}"] = round(
            result[f"tp2_batch{batch}_tok_s"] / result[f"tp1_batch{batch}_tok_s"], 2)
    result["greedy_tokens_identical"] = tokens[1] == tokens[2]
    return result


if __name__ == "__main__":
    main()
