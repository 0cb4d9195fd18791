"""vserve.frontend.tokenizer against transformers.AutoTokenizer, on the demo tokenizer and two others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from vserve.frontend.tokenizer import Tokenizer, load_chat_template
from vserve.models.demo import EOT_TOKEN_ID, write_demo_tokenizer

TEXTS = [
    "",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "new\nlines\n\n and\ttabs",
    "ünïcödé 你好 🙂👍🏽 €",
    "special <|eot_id|> inside </s> text [SEP]",
    "don't stop , please ! it's fine .",
]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2? 🙂 "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": 'And <b>3+3</b> & "quotes"?'},
    ],
]

# Llama-2 style; the standalone .jinja file must win over the config's template.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Exercises what HF's environment provides: namespace, loop controls, generation blocks,
# tojson with options, dict(), special tokens, extra variables, tools, trim/lstrip blocks.
FANCY_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m.role | upper }}]{% generation %}{{ m.content | tojson }}{% endgeneration %}
{% endfor %}
{{ {'b': '<&>', 'a': [1, 'é']} | tojson(indent=2, sort_keys=True) }}
{{ dict(x=1) | tojson }}{{ ns.n }}{{ bos_token }}|{{ eos_token }}|{{ custom | default('none') }}
{% if tools is not none %}{{ tools | tojson }}{% endif %}
{{ add_generation_prompt }}{{ strftime_now('%Y') }}"""


def _write_config(directory: Path, name: str, obj: object) -> None:
    (directory / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _training_lines() -> list[str]:
    from vserve.models.demo import _TRAINING_TEXT

    return _TRAINING_TEXT.splitlines()


def _build_spm_like(directory: Path) -> None:
    """Llama-2 style: ▁ normalizer, BPE with byte fallback, bos post-processor, .jinja file."""
    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(
        _training_lines(), trainers.BpeTrainer(vocab_size=120, show_progress=False)
    )
    trained = json.loads(tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].__getitem__):
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for m in trained["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((a, b))
    tok = RawTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(directory / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False}
    _write_config(
        directory,
        "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": added,
            "eos_token": {**added, "content": "</s>"},
            "unk_token": "<unk>",
            "add_bos_token": True,
            "chat_template": "CONFIG TEMPLATE (must lose to chat_template.jinja)",
        },
    )
    (directory / "chat_template.jinja").write_text(LLAMA2_TEMPLATE, encoding="utf-8")


def _build_wordpiece(directory: Path) -> None:
    """BERT style: WordPiece, clean-up on, named templates, special_tokens_map.json."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)  # so that the config-driven clean-up shows
    tok.train_from_iterator(
        _training_lines(),
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.save(str(directory / "tokenizer.json"))
    default = "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ sep_token }}{% endfor %}"
    tool_use = "TOOLS {{ tools | tojson }} " + default
    _write_config(
        directory,
        "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
            "clean_up_tokenization_spaces": True,
            "chat_template": [
                {"name": "default", "template": default},
                {"name": "tool_use", "template": tool_use},
            ],
        },
    )
    _write_config(
        directory,
        "special_tokens_map.json",
        {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": {"content": "[CLS]"}},
    )


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("demo", "spm", "wordpiece")}
    write_demo_tokenizer(dirs["demo"])
    _build_spm_like(dirs["spm"])
    _build_wordpiece(dirs["wordpiece"])
    return dirs


@pytest.fixture(scope="module", params=["demo", "spm", "wordpiece"])
def pair(request: pytest.FixtureRequest, tokenizer_dirs: dict[str, Path]) -> tuple[Tokenizer, Any]:
    from transformers import AutoTokenizer

    d = tokenizer_dirs[request.param]
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(str(d))


def test_encode_decode_match_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf) == len(ours)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert set(hf.all_special_ids) <= ours.all_special_ids
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                got = ours.decode(ids, skip_special_tokens=skip)
                assert got == hf.decode(ids, skip_special_tokens=skip), (text, add, skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_chat_template_matches_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = pair
    for conv in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected
    literal = ours.apply_chat_template(CONVERSATIONS[1], False, FANCY_TEMPLATE, custom="x")
    expected = hf.apply_chat_template(
        CONVERSATIONS[1], chat_template=FANCY_TEMPLATE, tokenize=False, custom="x"
    )
    assert literal == expected
    assert "TOOLS" not in literal  # the literal template was used, not a named one


def test_demo_chat_template_and_encoding(tokenizer_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dirs["demo"])
    text = tok.apply_chat_template([{"role": "user", "content": " hi "}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.bos_token_id is not None and ids.count(tok.bos_token_id) == 1 and EOT_TOKEN_ID in ids
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert len(tok.encode("the river and the forest", add_special_tokens=False)) < 15  # merges


def test_raise_exception_and_jinja_file(tokenizer_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(tokenizer_dirs["spm"])
    assert ours.chat_template == LLAMA2_TEMPLATE
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template(bad)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dirs["spm"]))
    with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    demo = Tokenizer.from_pretrained(tokenizer_dirs["demo"])
    with pytest.raises(ValueError, match="Unsupported role robot"):
        demo.apply_chat_template([{"role": "robot", "content": "x"}])


def test_named_templates_and_tools(tokenizer_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    d = tokenizer_dirs["wordpiece"]
    ours, hf = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(str(d))
    tools: list[Any] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    conv = CONVERSATIONS[0]
    got = ours.apply_chat_template(conv, tools=tools)
    assert got.startswith("TOOLS ")
    assert got == hf.apply_chat_template(
        conv, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(conv, chat_template="tool_use", tools=None).startswith("TOOLS")
    assert ours.special_tokens["pad_token"] == "[PAD]"  # filled in from special_tokens_map.json
    assert ours.special_tokens["cls_token"] == "[CLS]"  # an AddedToken dict there


def test_content_parts_and_none_values(tokenizer_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dirs["demo"])
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    messages = [{"role": "user", "content": parts, "name": None}]
    as_parts = tok.apply_chat_template(messages)
    as_string = tok.apply_chat_template([{"role": "user", "content": "line one\nline two"}])
    assert as_parts == as_string
    assert messages[0]["content"] is parts  # the caller's messages are not modified
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.raises(ValueError, match="'image_url'"):
        tok.apply_chat_template([{"role": "user", "content": [image]}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tok.apply_chat_template(["not a dict"])  # type: ignore[list-item]
    # content None (an assistant turn with tool calls) is dropped, as HF does; trim of undefined
    none_turn = tok.apply_chat_template([{"role": "assistant", "content": None}], False)
    assert none_turn.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}{{ messages.append(1) }}",
        "{{ raise_exception.__globals__ }}",
        "{{ ''.__class__ }}",  # renders "" in jinja's sandbox by default; we refuse outright
        "{% set ns = namespace(_secret=1) %}",
        "{% set d = {} %}{{ d.update({'a': 1}) }}",
        "{% for x in %}",  # a syntax error is a ValueError too
        "{{ 1 + 'a' }}",  # so is a runtime error in the template
    ],
)
def test_sandbox_rejects(tokenizer_dirs: dict[str, Path], template: str) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dirs["demo"])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


def test_chat_template_override_and_missing(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    d = tokenizer_dirs["demo"]
    path = tmp_path / "t.jinja"
    path.write_text("FILE {{ messages | length }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(d, chat_template=str(path)).apply_chat_template([]) == "FILE 0"
    literal = Tokenizer.from_pretrained(d, chat_template="LIT {{ add_generation_prompt }}")
    assert literal.apply_chat_template([], add_generation_prompt=False) == "LIT False"
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(OSError):
        load_chat_template(tmp_path / "missing.jinja")

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    tok = Tokenizer.from_pretrained(bare)
    assert tok.chat_template is None and tok.bos_token_id is None
    with pytest.raises(ValueError, match="has no chat template; pass --chat-template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_add_bos_token_without_post_processor(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    raw = json.loads((tokenizer_dirs["demo"] / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    _write_config(tmp_path, "tokenizer_config.json", config)
    assert Tokenizer.from_pretrained(tmp_path).encode("a") == [ord("a")]
    _write_config(tmp_path, "tokenizer_config.json", {**config, "add_bos_token": True})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("a") == [tok.bos_token_id, ord("a")]
    assert tok.encode("a", add_special_tokens=False) == [ord("a")]


def test_unknown_ids(tokenizer_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dirs["demo"])
    assert tok.decode([ord("a"), 310, ord("b")]) == "ab"  # padded vocab rows decode to ""
    assert tok.id_to_token(310) is None and tok.id_to_token(-1) is None
    assert tok.convert_ids_to_tokens([ord("a"), 310]) == ["a", ""]


def test_transformers_fallback_without_tokenizer_json(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    demo = RawTokenizer.from_file(str(tokenizer_dirs["demo"] / "tokenizer.json"))
    demo.model.save(str(tmp_path))  # vocab.json + merges.txt: a "slow" GPT-2 checkpoint
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|begin_of_text|>"}
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    _write_config(tmp_path, "tokenizer_config.json", {**config, "chat_template": template})
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == hf.bos_token_id is not None
    assert ours.vocab_size == len(hf)
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert ours.decode([ord("a"), 10**6]) == "a"


def test_normal_path_imports_neither_torch_nor_transformers(
    tokenizer_dirs: dict[str, Path],
) -> None:
    code = (
        "import sys\n"
        "from vserve.frontend.tokenizer import Tokenizer\n"
        "from vserve.frontend.detokenizer import IncrementalDetokenizer\n"
        f"tok = Tokenizer.from_pretrained({str(tokenizer_dirs['demo'])!r})\n"
        "ids = tok.encode(tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]))\n"
        "d = IncrementalDetokenizer(tok, ids, stop=['x'])\n"
        "assert d.update(tok.encode('ok', add_special_tokens=False)) + d.finish() == 'ok'\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
