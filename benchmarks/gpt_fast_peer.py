"""Decode with gpt-fast, the peer, on the shape ``benchmarks/gpu_serving.py`` measures.

gpt-fast (pytorch-labs) is not part of vserve: pass the path of its ``model.py`` (a copy is
in the development machines' ``../shared/peers/gpt-fast/``). This driver builds its
``Transformer`` for the Llama shape given as JSON (a Hugging Face config), fills it with
random bf16 weights, compiles one decode step with ``torch.compile(mode="reduce-overhead")``
as gpt-fast's ``generate.py`` does (math SDPA for decode), and prints one JSON line per
batch size: tokens/s and the bytes a step reads over its time.

    python benchmarks/gpt_fast_peer.py --model-py PATH/model.py --config CONFIG.json --batches 1,64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch


def _load(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpt_fast_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks its globals up by module name
    spec.loader.exec_module(module)
    return module


def _args(module, cfg: dict):  # type: ignore[no-untyped-def]
    scaling = cfg.get("rope_scaling") or None
    if scaling is not None:
        scaling = {"factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
                   "high_freq_factor": scaling["high_freq_factor"],
                   "original_max_position_embeddings":
                       scaling["original_max_position_embeddings"]}
    return module.ModelArgs(
        block_size=4096, n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
        n_local_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        rope_base=cfg["rope_theta"], norm_eps=cfg["rms_norm_eps"], rope_scaling=scaling)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-py", required=True, type=Path)
    p.add_argument("--config", required=True, type=Path, help="the HF config.json of the shape")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=256)
    a = p.parse_args()
    cfg = json.loads(a.config.read_text())
    module = _load(a.model_py)
    margs = _args(module, cfg)
    if margs.head_dim != cfg.get("head_dim", margs.head_dim):
        raise SystemExit(f"gpt-fast derives head_dim {margs.head_dim}; the shape has "
                         f"{cfg['head_dim']}")
    # The inductor settings gpt-fast's generate.py runs with.
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = True
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = module.Transformer(margs)
    model = model.to(torch.bfloat16).eval()
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    # A decode step reads every weight but the embedding table (one row of it).
    step_bytes = sum(t.numel() * t.element_size() for t in model.parameters()) \
        - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()

    def decode_one(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = model(x, pos)
        return torch.argmax(logits[:, -1], dim=-1, keepdim=True).to(torch.int)

    step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for batch in (int(b) for b in a.batches.split(",")):
        with torch.device("cuda"):
            model.setup_caches(max_batch_size=batch, max_seq_length=a.prompt + a.steps + 8)
        x = torch.randint(0, margs.vocab_size, (batch, a.prompt), device="cuda")
        with torch.no_grad():
            t0 = time.perf_counter()
            tok = decode_one(x, torch.arange(a.prompt, device="cuda"))  # prefill, eager
            pos = torch.tensor([a.prompt], device="cuda")
            with sdpa_kernel(SDPBackend.MATH):
                for _ in range(3):  # compile and warm up
                    tok = step(tok, pos).clone()
                    pos += 1
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                pos = torch.tensor([a.prompt], device="cuda")
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    tok = step(tok, pos).clone()
                    pos += 1
                torch.cuda.synchronize()
                took = time.perf_counter() - t0
        print(json.dumps({"peer": "gpt-fast", "batch": batch,
                          "tokens_per_s": batch * a.steps / took,
                          "step_ms": took / a.steps * 1e3,
                          "achieved_gbps_weights": step_bytes / (took / a.steps) / 1e9,
                          "compile_s": compile_s}), flush=True)


if __name__ == "__main__":
    main()
