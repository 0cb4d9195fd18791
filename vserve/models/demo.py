"""The built-in ``demo`` model: a tiny random-weight Llama with a byte-level BPE tokenizer.

It exists so that ``vserve serve demo``, the tests and the benchmarks run with nothing
downloaded. Everything here is deterministic: the same code writes the same bytes (tokenizer
training included), so the cache directory is named by a hash of what goes into it.

Layout of the tokenizer (``DEMO_VOCAB_SIZE`` = 300 ids):

* ids 0-255: the 256 byte tokens, id ``b`` is byte ``b`` (GPT-2 byte-to-unicode alphabet);
* ids 256-294: BPE merges learnt from ``_TRAINING_TEXT`` (common English pairs);
* ids 295-299: the Llama-3-style special tokens, in ``SPECIAL_TOKENS`` order.

The model's embedding has ``DEMO_MODEL_VOCAB_SIZE`` = 320 rows (padded, as real checkpoints
are), so it can sample ids 300-319 that the tokenizer does not know: they decode to "".

Only the weight writing imports torch (lazily); reusing a built directory imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT_TOKEN,
)
NUM_MERGES = 39
DEMO_VOCAB_SIZE = 256 + NUM_MERGES + len(SPECIAL_TOKENS)  # 300
DEMO_MODEL_VOCAB_SIZE = 320
BOS_TOKEN_ID = 256 + NUM_MERGES
EOS_TOKEN_ID = BOS_TOKEN_ID + 1
EOT_TOKEN_ID = BOS_TOKEN_ID + 4
MODEL_MAX_LENGTH = 4096
SEED = 0
MARKER_FILE = ".vserve-demo-complete"
# Part of the content hash (which covers this file's source); bump to force a rebuild.
_FORMAT_VERSION = 2
# Temp build directories older than this are leftovers of a crashed build (a build takes < 1 s).
_STALE_TMP_SECONDS = 3600.0

# Llama-3 style: bos, then one header + body + <|eot_id|> per message. With tools: a system
# block listing them first; assistant tool calls as hermes-style <tool_call> JSON; tool
# results under a "tool" header (``--tool-call-parser hermes`` reads the calls back).
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if tools %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCall functions as <tool_call>"
    "{\"name\": ..., \"arguments\": ...}</tool_call>:\\n' }}\n"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Unsupported role ' + message['role'] + "
    "'; expected system, user, assistant or tool') }}\n"
    "{%- endif %}\n"
    "{%- if message['tool_calls'] is defined %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' "
    "+ (message['content'] or '') | trim }}\n"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>' + {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson + '</tool_call>' }}"
    "{%- endfor %}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- else %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ (message['content'] or '') | trim + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the
forest where the trees are tall and the light is thin. There is a river in the forest, and in
the river there are fish that swim in the cold water. The people of the town often walk to the
river in the evening, when the sun is low and the air is cool. They talk about the weather, the
harvest, and the news from the city. Some of them bring bread and cheese; others bring nothing
but their stories. A serving system answers requests: it reads the prompt, runs the model, and
returns the generated text to the user as soon as each token is ready. The scheduler decides
which requests run in each step, and the cache keeps the keys and values of the tokens that the
model has already seen. When the memory is full, the newest requests wait until others finish.
This is the story of the town, the river, the forest and the model that learnt to write it.
"""

_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "vocab_size": DEMO_MODEL_VOCAB_SIZE,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "initializer_range": 0.1,
}

_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": [EOS_TOKEN_ID, EOT_TOKEN_ID],
}


def _train_merges() -> list[tuple[str, str]]:
    """Learn ``NUM_MERGES`` merges from ``_TRAINING_TEXT``.

    Deterministic: the trainer breaks count ties by pair order, not by hash order (checked by
    ``tests/test_demo.py`` across processes with different hash seeds).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + NUM_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    out = [(a, b) for a, b in (m.split(" ") if isinstance(m, str) else m for m in merges)]
    if len(out) != NUM_MERGES:
        raise RuntimeError(f"demo tokenizer training learnt {len(out)} merges, want {NUM_MERGES}")
    return out


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map as a list: entry ``b`` is the character for byte ``b``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_demo_tokenizer() -> Tokenizer:
    """The demo tokenizer in memory (see the module docstring for the id layout)."""
    vocab = {ch: b for b, ch in enumerate(_byte_alphabet())}
    merges = _train_merges()
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    if tok.get_vocab_size() != DEMO_VOCAB_SIZE or tok.token_to_id(EOT_TOKEN) != EOT_TOKEN_ID:
        raise RuntimeError("demo tokenizer layout changed; update the id constants")
    return tok


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_demo_tokenizer(directory: Path) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns the tokenizer's vocabulary size (special tokens included), ``DEMO_VOCAB_SIZE``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_demo_tokenizer()
    tok.save(str(directory / "tokenizer.json"), pretty=True)
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        directory / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    )
    return tok.get_vocab_size()


def _write_weights(path: Path) -> None:
    # Lazy: only a build needs torch; API servers reusing the cache must stay light.
    import torch
    from safetensors.torch import save_file

    c = _CONFIG
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c["head_dim"]
    q_out = c["num_attention_heads"] * head_dim
    kv_out = c["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(SEED)
    std = 0.1

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    # Generation order is fixed (this list), so the bytes are too.
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rand(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, q_out)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = rand(vocab, hidden)
    save_file(tensors, str(path), metadata={"format": "pt"})


@lru_cache(maxsize=1)
def content_version() -> str:
    """A short hash of this module's source: everything that determines the files is in it, so
    any change to it (config, training text, seed, weight layout) names a fresh directory."""
    source = Path(__file__).read_bytes()
    return hashlib.sha256(b"%d\0" % _FORMAT_VERSION + source).hexdigest()[:12]


def default_demo_dir(cache_root: Path | None = None) -> Path:
    """``<cache_root>/demo-<content version>``; ``cache_root`` defaults to ``~/.cache/vserve``."""
    root = cache_root if cache_root is not None else Path.home() / ".cache" / "vserve"
    return root / f"demo-{content_version()}"


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds a finished build of this version (its marker names it)."""
    try:
        return (directory / MARKER_FILE).read_text() == content_version()
    except OSError:
        return False


def _write_model(directory: Path) -> None:
    _write_json(directory / "config.json", _CONFIG)
    _write_json(directory / "generation_config.json", _GENERATION_CONFIG)
    _write_weights(directory / "model.safetensors")
    write_demo_tokenizer(directory)
    # The marker is written last: its presence means every other file is in place.
    (directory / MARKER_FILE).write_text(content_version())


def _remove_stale_tmp_dirs(parent: Path, prefix: str) -> None:
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def build_demo_model(directory: Path | None = None, *, cache_root: Path | None = None) -> Path:
    """Write the demo model into ``directory`` (default: ``default_demo_dir(cache_root)``).

    Returns the directory, which then holds ``config.json``, ``generation_config.json``,
    ``model.safetensors``, the tokenizer files and the completion marker.

    Safe under concurrency: each caller builds in its own temp directory beside the target and
    renames it into place; ``rename`` is atomic, so readers never see a partial directory and
    exactly one build wins (a loser finds the target complete and discards its own). A complete
    target is reused without rebuilding; an empty one, or a build of another version (it has a
    marker), is replaced. Any other existing target raises ``FileExistsError``: not ours to
    delete.
    """
    target = Path(directory) if directory is not None else default_demo_dir(cache_root)
    target = target.expanduser()
    if is_complete(target):
        return target
    replace_old = (target / MARKER_FILE).is_file()
    if target.exists() and not replace_old and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a complete vserve demo model")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    _remove_stale_tmp_dirs(target.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary directory
    try:
        _write_model(tmp)
        old = tmp.with_name(tmp.name + "-old")  # the temp prefix: a crash leaves it to cleanup
        if replace_old and not is_complete(target):
            try:
                os.rename(target, old)
            except FileNotFoundError:
                pass  # another builder moved it first
        try:
            # POSIX rename replaces an empty directory and fails on a non-empty one.
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
            # Another process won the race; its build is identical to ours.
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m vserve.models.demo [DIR]``: build the demo model (default: the cache
    directory) and print where it is."""
    args = sys.argv[1:] if argv is None else argv
    print(build_demo_model(Path(args[0]) if args else None))


if __name__ == "__main__":
    main()
