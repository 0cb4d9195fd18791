"""Single-request latency on CPU, side by side with vLLM's CPU build, on the same model.

Serves one model with ``vserve serve`` and with vLLM (a venv made by
``../shared/tools/vllm-cpu/install_vllm_cpu.sh``; never part of this repository), one at a
time, alternating ``--rounds`` times, and drives each with ``vserve bench serve`` at
concurrency 1 (streaming, greedy, ``--input-len`` prompt / ``--output-len`` output tokens).
Reports inter-token latency (median, p99), TPOT and TTFT per server and their ratio.

    python benchmarks/peer_cpu_latency.py --vllm-venv /tmp/vllm-venv   # a tiny Llama
    python benchmarks/peer_cpu_latency.py --vllm-venv VENV --model-dir DIR

The default model is a tiny random Llama written here (2 layers, hidden 256, head_dim 64,
a word-level tokenizer whose every token is text): vLLM's CPU attention does not take the demo
model's head_dim of 16, and a tiny model makes the comparison one of the serving stacks, not of
matrix kernels. ``events/token`` is stream events per output token: 1.00 when every token is
its own event; below 1 a server sent tokens together, which shows as ITL gaps of 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_VSERVE_UP = re.compile(r"vserve is serving .* on (http://\S+)")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def start(kind: str, model_dir: str, port: int, vllm_venv: str, log: Path) -> tuple[
        subprocess.Popen[bytes], str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
    if kind == "vserve":
        cmd = [sys.executable, "-m", "vserve.cli.main", "serve", model_dir, "--port", str(port),
               "--device", "cpu", "--max-model-len", "2048"]
    else:
        cmd = [str(Path(vllm_venv) / "bin" / "vllm"), "serve", model_dir, "--host",
               "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc)
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench(url: str, model_dir: str, a: argparse.Namespace, out: Path) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "vserve.cli.main", "bench", "serve", "--base-url", url,
                    "--num-prompts", str(a.num_prompts), "--input-len", str(a.input_len),
                    "--output-len", str(a.output_len), "--max-concurrency", "1", "--stream",
                    "--extra-body", '{"temperature": 0}', "--tokenizer", model_dir,
                    "--num-warmups", "3", "--result-json", str(out), "--quiet",
                    "--disable-tqdm"], check=True)
    res = json.loads(out.read_text())
    row = {k: res[k] for k in ("median_itl_ms", "p99_itl_ms", "median_tpot_ms",
                               "median_ttft_ms", "output_throughput")}
    # Below 1: some stream events carried several tokens, or arrived together (their gaps
    # count as 0 ms: a median ITL of 0 means most tokens came in pairs or bursts).
    row["events_per_token"] = res["total_chunks"] / max(res["total_output_tokens"], 1)
    return row


def make_tiny_llama(directory: Path) -> str:
    import torch
    import transformers

    from vserve.models.demo import BOS_TOKEN_ID, EOS_TOKEN_ID

    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    write_word_tokenizer(directory, config.vocab_size, BOS_TOKEN_ID, EOS_TOKEN_ID)
    return str(directory)


def write_word_tokenizer(directory: Path, vocab_size: int, bos: int, eos: int) -> None:
    """A word-level tokenizer: id ``i`` is the word ``w<i>``, decoded with a space before it.
    Every token the random model samples is text on its own, so both servers stream one
    chunk per token and inter-token latency is per token. (With a byte-level tokenizer a
    random model samples many ids that end inside a UTF-8 character; servers hold those back
    and the chunk gaps measure the tokenizer as much as the server.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = {bos: "<s>", eos: "</s>"}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "w0", "model_max_length": 4096, "clean_up_tokenization_spaces": False}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-venv", required=True)
    p.add_argument("--model-dir", default=None, help="default: a tiny Llama written here")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peer-latency-"))
    if a.model_dir is None:
        a.model_dir = make_tiny_llama(work / "tiny-llama")
    rows: dict[str, list[dict[str, float]]] = {"vserve": [], "vllm": []}
    for r in range(a.rounds):
        for kind, port in (("vserve", 8311), ("vllm", 8312)):
            proc, url = start(kind, a.model_dir, port, a.vllm_venv, work / f"{kind}-{r}.log")
            try:
                rows[kind].append(bench(url, a.model_dir, a, work / f"{kind}-{r}.json"))
            finally:
                stop(proc)
            print(kind, r, rows[kind][-1], flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    print(f"\n{'server':>7} {'ITL med ms':>10} {'ITL p99 ms':>10} {'TPOT ms':>8} {'TTFT ms':>8}"
          f" {'tok/s':>7} {'events/token':>12}   (median of {a.rounds} alternating rounds)")
    for k, m in med.items():
        print(f"{k:>7} {m['median_itl_ms']:>10.2f} {m['p99_itl_ms']:>10.2f} "
              f"{m['median_tpot_ms']:>8.2f} {m['median_ttft_ms']:>8.2f} "
              f"{m['output_throughput']:>7.0f} {m['events_per_token']:>12.2f}")
    for metric, name in (("median_itl_ms", "median ITL"), ("median_tpot_ms", "median TPOT")):
        theirs = med["vllm"][metric]
        ratio = f"{med['vserve'][metric] / theirs:.2f}" if theirs > 0 else "n/a (vLLM's is 0)"
        print(f"vserve / vLLM {name}: {ratio}")
    print(f"logs and results: {work}")


if __name__ == "__main__":
    main()
