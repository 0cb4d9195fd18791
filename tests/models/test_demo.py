"""The built-in demo model: deterministic, loadable by transformers, safe to build concurrently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from vserve.models import demo

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    demo.MARKER_FILE,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    path = demo.build_demo_model(cache_root=tmp_path_factory.mktemp("cache"))
    assert time.perf_counter() - start < 5.0
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_layout_and_default_location(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == MODEL_FILES
    assert model_dir.name == f"demo-{demo.content_version()}"
    assert len(demo.content_version()) == 12
    home_default = Path.home() / ".cache" / "vserve" / model_dir.name
    assert demo.default_demo_dir() == home_default
    assert demo.is_complete(model_dir)


def test_write_demo_tokenizer(tmp_path: Path) -> None:
    vocab = demo.write_demo_tokenizer(tmp_path / "tok")
    assert vocab == demo.DEMO_VOCAB_SIZE <= 300
    raw = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert raw["pre_tokenizer"]["type"] == "ByteLevel" and raw["decoder"]["type"] == "ByteLevel"
    assert len(raw["model"]["merges"]) == demo.NUM_MERGES >= 24  # "a few dozen"
    specials = {t["content"]: t["id"] for t in raw["added_tokens"] if t["special"]}
    assert list(specials) == list(demo.SPECIAL_TOKENS)
    assert specials["<|begin_of_text|>"] == demo.BOS_TOKEN_ID
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert config["model_max_length"] == 4096 and "add_generation_prompt" in config["chat_template"]
    stm = json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())
    assert stm == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def test_config_and_weights(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 320,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": demo.BOS_TOKEN_ID,
        "eos_token_id": demo.EOS_TOKEN_ID,
    }
    assert {k: config[k] for k in expected} == expected
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [demo.EOS_TOKEN_ID, demo.EOT_TOKEN_ID]

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    shapes = {
        "model.embed_tokens.weight": (320, 64),
        "model.norm.weight": (64,),
        "lm_head.weight": (320, 64),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (64, 64),
            p + "self_attn.k_proj.weight": (32, 64),
            p + "self_attn.v_proj.weight": (32, 64),
            p + "self_attn.o_proj.weight": (64, 64),
            p + "mlp.gate_proj.weight": (128, 64),
            p + "mlp.up_proj.weight": (128, 64),
            p + "mlp.down_proj.weight": (64, 128),
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
        }
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    for name, t in tensors.items():
        assert str(t.dtype) == "torch.float32"
        if t.dim() == 1:
            assert bool((t == 1).all()), name
        else:
            assert 0.09 < float(t.std()) < 0.11, name
    # Distinct draws, not one matrix repeated.
    assert not bool((tensors["lm_head.weight"] == tensors["model.embed_tokens.weight"]).all())


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = demo.build_demo_model(tmp_path / "again")
    assert _files(again) == _files(model_dir)


def test_training_is_deterministic_across_processes() -> None:
    # The trainer's Rust hash maps are seeded per process: a fresh process is a fresh seed.
    code = "import json; from vserve.models.demo import _train_merges; print(json.dumps(_train_merges()))"
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    here = [list(m) for m in demo._train_merges()]
    assert [json.loads(r.stdout) for r in runs] == [here, here]


def test_complete_build_is_reused_without_torch(model_dir: Path) -> None:
    code = (
        "import sys\nfrom pathlib import Path\nfrom vserve.models import demo\n"
        "demo._write_model = None  # reuse must not rebuild\n"
        f"assert demo.build_demo_model(Path({str(model_dir)!r})) == Path({str(model_dir)!r})\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_loads_with_transformers(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vserve.frontend.tokenizer import Tokenizer

    loaded: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    model, info = loaded
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer.from_pretrained(model_dir)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (demo.BOS_TOKEN_ID, demo.EOS_TOKEN_ID)
    ids = ours.encode("The river and the forest")
    assert ids == hf_tok.encode("The river and the forest")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 320) and bool(torch.isfinite(logits).all())
    # The embedding matches the file: from_pretrained did not re-initialise anything.
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert torch.equal(model.lm_head.weight, f.get_tensor("lm_head.weight"))


def test_concurrent_builds_in_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    original = demo._write_model

    def slow_write(d: Path) -> None:
        builds.append(d)
        original(d)
        time.sleep(0.2)  # all builders are mid-build at once, then race to rename

    monkeypatch.setattr(demo, "_write_model", slow_write)
    barrier, results = threading.Barrier(4), []

    def worker() -> None:
        barrier.wait()
        results.append(demo.build_demo_model(cache_root=tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 4 and len(results) == 4 and len(set(results)) == 1
    assert demo.is_complete(results[0]) and {p.name for p in results[0].iterdir()} == MODEL_FILES
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp dirs left


def test_concurrent_builds_in_processes(tmp_path: Path) -> None:
    root, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    # Weights are stubbed (written elsewhere in this file): the race, not torch, is under test.
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom vserve.models import demo\n"
        "demo._write_weights = lambda path: path.write_bytes(b'stub')\n"
        "built = []\noriginal = demo._write_model\n"
        "def slow(d):\n    built.append(d); original(d); time.sleep(0.5)\n"
        "demo._write_model = slow\n"
        "signals = Path(sys.argv[2])\n(signals / sys.argv[3]).touch()\n"
        "while not (signals / 'go').exists():\n    time.sleep(0.005)\n"
        "print(demo.build_demo_model(cache_root=Path(sys.argv[1])), len(built))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root), str(signals), f"ready{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 60
    while len(list(signals.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.01)
    (signals / "go").touch()  # both start building together
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.split()[0] for out, _ in outs}
    assert [out.split()[1] for out, _ in outs] == ["1", "1"]  # both built; one rename won
    assert len(paths) == 1 and demo.is_complete(Path(paths.pop()))
    assert len(list(root.iterdir())) == 1  # no temp dirs left


def test_existing_targets(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo.is_complete(demo.build_demo_model(empty))  # an empty directory is replaced

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo.build_demo_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    old = demo.build_demo_model(tmp_path / "old")
    (old / demo.MARKER_FILE).write_text("another version")  # a build by other code: replaced
    (old / "model.safetensors").write_bytes(b"stale")
    assert demo.build_demo_model(old) == old and demo.is_complete(old)
    assert (old / "model.safetensors").read_bytes() != b"stale"

    # A crashed build's temp dir is removed once stale; a fresh one (a live builder's) is kept.
    stale, live = tmp_path / ".target.tmp-stale", tmp_path / ".target.tmp-live"
    stale.mkdir()
    live.mkdir()
    long_ago = time.time() - 2 * 3600
    os.utime(stale, (long_ago, long_ago))
    demo.build_demo_model(tmp_path / "target")
    assert not stale.exists() and live.exists()
