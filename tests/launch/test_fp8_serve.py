"""FP8 through ``vserve serve`` and the official client: an FP8 (compressed-tensors)
checkpoint served as it is, and ``--quantization fp8`` on a 16-bit checkpoint, each answer
the greedy tokens transformers gives on the dequantized weights; a quantization vserve
cannot run stops the server at startup with the field's name."""

from __future__ import annotations

import json
import random
import subprocess

import httpx
import openai
from helpers.models import (
    hf_greedy,
    make_tiny_model,
    random_prompt,
    write_dequantized,
    write_fp8_checkpoint,
)
from helpers.serve import VSERVE, serve

from vserve import LLM, SamplingParams


def _text(base_url: str, prompt: list[int], n: int) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                    max_tokens=n, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_serve_fp8_checkpoint_and_quantization_flag_match_transformers(tmp_path):
    """The offline engine's tokens are transformers' on the dequantized weights; the server
    answers that text, for the FP8 checkpoint and for the 16-bit one with the flag."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    fp8_dir = write_fp8_checkpoint(model_dir, tmp_path / "fp8")
    reference = write_dequantized(fp8_dir, tmp_path / "ref")
    prompt = random_prompt(random.Random(2), 12)
    want, _ = hf_greedy(reference, prompt, 12)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for args in ([str(fp8_dir)], [str(model_dir), "--quantization", "fp8"]):
        quantization = "fp8" if len(args) > 1 else None
        with LLM(args[0], dtype="float32", quantization=quantization) as llm:
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want, args
        assert out.outputs[0].text  # something to compare
        with serve(*args, "--dtype", "float32", "--max-model-len", "256") as srv:
            assert _text(srv.base_url, prompt, 12) == out.outputs[0].text, args


def test_serve_refuses_an_unsupported_quantization_by_name(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(VSERVE + [str(model_dir), "--port", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Unsupported quantization_config: quant_method 'awq'" in proc.stderr, \
        proc.stderr[-3000:]


def test_serve_kv_cache_dtype_fp8(tmp_path):
    """``--kv-cache-dtype fp8`` through the server: the answer is the offline engine's with
    the same float8 cache (itself checked against transformers with rounded keys and values
    in ``tests/offline/test_kv_cache_fp8.py``), the startup log names the cache's dtype, and
    a float8 format vserve does not store is refused by name before anything starts; an FP8
    checkpoint's calibrated KV-cache scales are served."""
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    prompt = random_prompt(random.Random(5), 20)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    with LLM(str(model_dir), dtype="float32", kv_cache_dtype="fp8") as llm:
        fp8 = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    with LLM(str(model_dir), dtype="float32") as llm:
        wide = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    with serve(str(model_dir), "--dtype", "float32", "--max-model-len", "256",
               "--kv-cache-dtype", "fp8") as srv:
        assert _text(srv.base_url, prompt, 16) == fp8.outputs[0].text
        assert "float8_e4m3fn" in srv.log()
        metrics = httpx.get(srv.base_url + "/metrics", timeout=30).text
        assert 'cache_dtype="float8_e4m3fn"' in metrics, metrics[-3000:]
    # The float8 run is not the 32-bit one (else the comparison above proves nothing).
    want_wide, _ = hf_greedy(model_dir, prompt, 16)
    assert wide.outputs[0].token_ids == want_wide
    chosen = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
              for o in (fp8, wide)]
    assert max(abs(x - y) for x, y in zip(*chosen)) > 1e-3
    # An FP8 checkpoint carrying calibrated KV-cache scales (kv_cache_scheme): served with
    # them, the offline engine's answer (itself checked against transformers rounding by the
    # same scales in tests/offline/test_kv_cache_fp8.py).
    scaled = write_fp8_checkpoint(model_dir, tmp_path / "fp8kv",
                                  kv_scales=[(0.37, 0.053), (1.9, 0.011)])
    with LLM(str(scaled), dtype="float32", kv_cache_dtype="fp8") as llm:
        want = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    with serve(str(scaled), "--dtype", "float32", "--max-model-len", "256",
               "--kv-cache-dtype", "fp8") as srv:
        assert _text(srv.base_url, prompt, 16) == want.outputs[0].text
    proc = subprocess.run(VSERVE + [str(model_dir), "--port", "0", "--kv-cache-dtype",
                                    "fp8_e5m2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--kv-cache-dtype" in proc.stderr and "fp8_e5m2" in proc.stderr, proc.stderr[-2000:]
