"""What structured outputs cost: grammar compile time, and decode throughput with every row
constrained against the same batch unconstrained, side by side in one process.

    python benchmarks/structured_overhead.py --batch 1,64,256            # GPU: 1B shape
    python benchmarks/structured_overhead.py --model demo --batch 1,16   # CPU: demo model
    python benchmarks/structured_overhead.py --batch 64,256 --grammar-threads 0,1,2,4
        # the grammar's own host work per step by llguidance thread count, no model

The token mask's cost grows with the vocabulary, so the GPU run pairs the Llama-3.2-1B-shaped
checkpoint of ``gpu_serving.py`` with a synthetic byte-level BPE tokenizer of the same size
(128,256 ids: random merges of existing tokens, lengths like a real vocabulary's) instead of
the demo tokenizer's 300 ids. Nothing is downloaded.

Constrained rows follow ``{"text": string}``: free text inside a JSON string, the common case,
keeps the grammar open for the measured tokens (a mask per token, almost every token allowed
but the quote-breaking ones; a random model closes the string rarely). A bounded string
(``minLength``/``maxLength`` in the thousands) is far costlier per mask: measured on the
H200 host, ~0.35 ms per row per token. Rows sample at temperature 1 with ``ignore_eos``; the unconstrained
baselines are the same requests at temperature 1 and greedy (whose argmax runs inside the
CUDA graph). Reported per batch: output tokens/s of each and the loss of the constrained run
against each baseline. Compile: a 20-property schema, cold (first compile, and separately
the tokenizer's conversion) and cached (a copy of the compiled grammar).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

TWENTY_PROPERTIES = {
    "type": "object",
    "properties": {
        **{f"s{i}": {"type": "string", "maxLength": 32} for i in range(6)},
        **{f"i{i}": {"type": "integer", "minimum": 0, "maximum": 10000} for i in range(4)},
        **{f"b{i}": {"type": "boolean"} for i in range(3)},
        "when": {"type": "string", "format": "date-time"},
        "email": {"type": "string", "format": "email"},
        "kind": {"enum": ["a", "b", "c", "d"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
        "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                   "y": {"type": "number"}},
                  "required": ["x", "y"]},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["s0", "i0", "b0", "kind", "point"],
}
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string"}},
             "required": ["text"]}


def synthetic_tokenizer(directory: Path, vocab_size: int, seed: int = 0) -> None:
    """A byte-level BPE ``tokenizer.json`` of ``vocab_size`` ids: 256 byte tokens, random
    merges of existing tokens (up to 16 bytes long), and an EOS at the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vserve.models.demo import _byte_alphabet

    rng = random.Random(seed)
    alphabet = _byte_alphabet()
    common = [alphabet[b] for b in b"etaoinshrdlucmfwypvbgkqjxz ETAOINS.,"]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokens = list(alphabet)
    merges: list[tuple[str, str]] = []
    short = common[:]
    while len(tokens) < vocab_size - 1:
        a = rng.choice(short if rng.random() < 0.7 else tokens)
        b = rng.choice(common if rng.random() < 0.8 else tokens)
        merged = a + b
        if merged in vocab or len(merged) > 16:
            continue
        vocab[merged] = len(tokens)
        tokens.append(merged)
        merges.append((a, b))
        if len(merged) <= 4:
            short.append(merged)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|eos|>"])
    tok.save(str(directory / "tokenizer.json"))


def compile_times(model_dir: Path, vocab: int, eos: int) -> dict[str, float]:
    from vserve.structured.grammar import json_schema
    from vserve.structured.matcher import StructuredOutputs

    so = StructuredOutputs(model_dir, vocab, [eos])
    t0 = time.perf_counter()
    so.tokenizer()
    tokenizer_s = time.perf_counter() - t0
    spec = json_schema(TWENTY_PROPERTIES)
    t0 = time.perf_counter()
    so.submit(spec).result()
    cold = time.perf_counter() - t0
    cached = []
    for _ in range(20):
        t0 = time.perf_counter()
        so.submit(spec).result()
        cached.append(time.perf_counter() - t0)
    so.shutdown()
    return {"tokenizer_conversion_ms": tokenizer_s * 1e3, "compile_cold_ms": cold * 1e3,
            "compile_cached_ms_median": sorted(cached)[len(cached) // 2] * 1e3}


def grammar_work(model_dir: Path, vocab: int, eos: int, batch: int, threads: int,
                 steps: int = 60) -> dict[str, float]:
    """The grammar's own host work per step for ``batch`` rows of ``LONG_TEXT`` mid-string,
    no model: fill every row's mask, pick an allowed token per row, consume them. ``threads``
    0: row by row in this thread; else on an llguidance executor of that many threads
    (``consume_token_par`` for the consume). Medians over ``steps`` less the first 10, µs."""
    import numpy as np
    from llguidance import LLExecutor

    from vserve.structured.grammar import json_schema
    from vserve.structured.matcher import StructuredOutputs, allowed_token, bitmask_width

    so = StructuredOutputs(model_dir, vocab, [eos])
    spec = json_schema(LONG_TEXT)
    matchers = [so.submit(spec).result() for _ in range(batch)]
    width = bitmask_width(vocab)
    out = np.zeros((batch, width), dtype=np.int32)
    executor = LLExecutor(num_threads=threads) if threads else None
    rng = random.Random(batch)
    fill, consume = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        if executor is None:
            for i, m in enumerate(matchers):
                m.unsafe_compute_mask_ptr(out.ctypes.data + i * width * 4, width * 4)
        else:
            executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                             out.ctypes.data, width * 4, batch)
        t1 = time.perf_counter()
        pairs = []
        for i, m in enumerate(matchers):
            token = allowed_token(out[i], rng.getrandbits(62))
            pairs.append((m, token if token is not None else eos))
        t2 = time.perf_counter()
        if executor is None:
            for m, token in pairs:
                m.consume_token(token)
        else:
            executor.consume_token_par(pairs)
        t3 = time.perf_counter()
        if step >= 10:
            fill.append(t1 - t0)
            consume.append(t3 - t2)
        # A row whose token closed the document starts a new one (rare: few tokens hold a
        # quote), so every step measures the same number of live rows.
        matchers = [so.submit(spec).result() if m.is_stopped() else m for m in matchers]
    so.shutdown()
    return {"batch": batch, "threads": threads,
            "fill_us": sorted(fill)[len(fill) // 2] * 1e6,
            "consume_us": sorted(consume)[len(consume) // 2] * 1e6}


def decode_rate(core: Any, batch: int, tokens: int, constrained: bool, greedy: bool,
                eos: int) -> float:
    from vserve.protocol.requests import EngineCoreRequest
    from vserve.protocol.sampling import SamplingParams
    from vserve.structured.grammar import json_schema

    rng = random.Random(batch)
    so = json_schema(LONG_TEXT) if constrained else None
    for i in range(batch):
        params = SamplingParams(temperature=0.0 if greedy else 1.0, seed=i, max_tokens=tokens,
                                ignore_eos=True, structured=so)
        prompt = [rng.randrange(300) for _ in range(32)]
        core.add_request(EngineCoreRequest(f"b{batch}-{constrained}-{greedy}-{i}-{time.time()}",
                                           prompt, params, [eos], time.time()))
    # Wait out compiles and prefill, then time the decode steps.
    produced, t0 = 0, None
    while core.has_unfinished_requests():
        outs = core.step()
        n = sum(len(o.token_ids) for o in outs.values())
        if t0 is None and n >= batch:  # the first token of every row is out
            t0, produced = time.perf_counter(), 0
            continue
        produced += n
    _sync()
    assert t0 is not None
    return produced / (time.perf_counter() - t0)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama1b", help="llama1b (GPU) or demo")
    p.add_argument("--batch", default="1,64,256")
    p.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true",
                   help="cProfile the constrained run of the largest batch (top 25 printed)")
    p.add_argument("--grammar-threads", default=None, metavar="LIST",
                   help="only the grammar's host work per step (no model, any machine): "
                        "mask fill and token consumption at each --batch, row by row (0) "
                        "and on llguidance executors of these thread counts, e.g. 0,1,2,4")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch CPU threads of the engine (default: sized as a served engine's)")
    args = p.parse_args()
    import torch

    from vserve.config import (
        CacheConfig,
        DeviceConfig,
        EngineConfig,
        ModelConfig,
        SchedulerConfig,
    )
    from vserve.engine.core import EngineCore
    from vserve.engine.core_proc import size_cpu_threads
    from vserve.models.source import resolve_model_dir

    device = DeviceConfig(cpu_threads=args.cpu_threads)
    # Before any torch work, as in the engine process.
    size_cpu_threads(EngineConfig(model=ModelConfig(model="demo"), device=device), 1)

    if args.model == "demo":
        model_dir = resolve_model_dir("demo")
        vocab, eos = 320, 296
        tmp = Path(tempfile.mkdtemp(prefix="vserve-so-"))
    else:
        from gpu_serving import SHAPES, make_model

        tmp = Path(tempfile.mkdtemp(prefix="vserve-so-"))
        # The grammar's work needs only the tokenizer: no 2.5 GB of weights for it.
        model_dir = tmp if args.grammar_threads else make_model(tmp / "llama1b", SHAPES["1b"])
        vocab = 128256
        synthetic_tokenizer(model_dir, vocab)
        eos = vocab - 1
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                              else "cpu", "model": args.model,
                              "cpu_threads": torch.get_num_threads()}
    result["compile"] = compile_times(model_dir, vocab, eos)
    print(json.dumps(result["compile"]), flush=True)
    batches = [int(b) for b in args.batch.split(",") if b]
    if args.grammar_threads is not None:
        result["grammar_work"] = []
        for b in batches:
            for t in (int(x) for x in args.grammar_threads.split(",") if x):
                row = grammar_work(model_dir, vocab, eos, b, t)
                result["grammar_work"].append(row)
                print(json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return
    core = EngineCore(EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=1024),
        cache=CacheConfig(gpu_memory_utilization=0.85),
        scheduler=SchedulerConfig(max_num_seqs=max(batches)),
        device=device), model_dir)
    decode_rate(core, min(batches), 8, True, False, eos)  # warm-up: compiles, kernels
    rows = []
    for b in batches:
        free = decode_rate(core, b, args.tokens, False, False, eos)
        greedy = decode_rate(core, b, args.tokens, False, True, eos)
        constrained = decode_rate(core, b, args.tokens, True, False, eos)
        row = {"batch": b, "unconstrained_sampled_tok_s": free,
               "unconstrained_greedy_tok_s": greedy, "constrained_tok_s": constrained,
               "loss_vs_sampled_pct": 100 * (1 - constrained / free),
               "loss_vs_greedy_pct": 100 * (1 - constrained / greedy)}
        rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)
    result["decode"] = rows
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        decode_rate(core, max(batches), 32, True, False, eos)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
