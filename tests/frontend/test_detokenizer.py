"""IncrementalDetokenizer: the invariants of its docstring, checked on seeded random streams."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers

from vserve.frontend.detokenizer import IncrementalDetokenizer, token_display
from vserve.frontend.tokenizer import Tokenizer
from vserve.models.demo import (
    BOS_TOKEN_ID,
    DEMO_MODEL_VOCAB_SIZE,
    DEMO_VOCAB_SIZE,
    write_demo_tokenizer,
)

MULTIBYTE = ["é", "ß", "€", "你好", "日本語", "🙂", "👍🏽", "👨‍👩‍👧", "\ufffd"]
WORDS = ["the", " river", " and", " forest", "\n", " STOP", "!", " ", "</s>", "##"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp("demo_tok")
    write_demo_tokenizer(d)
    return Tokenizer.from_pretrained(d)


def random_ids(rng: random.Random, tok: Tokenizer, n_pieces: int) -> list[int]:
    """Byte-level chaos: words, multi-byte chars (split across byte tokens), raw bytes (partial
    and invalid UTF-8), special tokens, and ids beyond the tokenizer's vocabulary."""
    ids: list[int] = []
    for _ in range(n_pieces):
        kind = rng.random()
        if kind < 0.35:
            ids += tok.encode(rng.choice(WORDS), add_special_tokens=False)
        elif kind < 0.6:
            ids += tok.encode(rng.choice(MULTIBYTE), add_special_tokens=False)
        elif kind < 0.75:
            ids.append(rng.randrange(256))  # any byte: often a partial or invalid sequence
        elif kind < 0.85:
            ids.append(rng.randrange(256, DEMO_VOCAB_SIZE))  # merges and special tokens
        elif kind < 0.9:
            ids.append(rng.randrange(DEMO_VOCAB_SIZE, DEMO_MODEL_VOCAB_SIZE))  # unknown ids
        else:
            ids += tok.encode(rng.choice(MULTIBYTE), add_special_tokens=False)[:1]  # truncated
    return ids


def chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([0, 1, 1, 1, 2, 3, 5])
        out.append(ids[i : i + n])
        i += n
    return out


def expected_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: scan the final text character by character; the first stop to complete wins
    (the longest when several complete at the same character)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text.startswith(s, end - len(s)) and end >= len(s)]
        if done:
            s = max(done, key=len)
            return text[: end if include else end - len(s)], s
    return text, None


@pytest.mark.parametrize("skip", [True, False])
def test_random_streams_without_stop(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234 + skip)
    for _ in range(600):
        prompt = random_ids(rng, tok, rng.randrange(0, 6))
        out = random_ids(rng, tok, rng.randrange(1, 25))
        final = tok.decode(out, skip_special_tokens=skip)
        d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        emitted, fed = "", []
        for chunk in chunks(rng, out):
            delta = d.update(chunk)
            fed += chunk
            emitted += delta
            assert emitted == d.output_text  # (a)
            assert final.startswith(emitted)  # (b): emitted text is final
            assert not delta.endswith("\ufffd")  # (b): no partial character mid-stream
            so_far = tok.decode(fed, skip_special_tokens=skip)
            if not so_far.endswith("\ufffd"):
                assert emitted == so_far  # nothing held back without a reason
        emitted += d.finish()
        assert emitted == d.output_text == final  # (a)
        assert d.stop_matched is None
        assert d.update([ord("x")]) == "" and d.finish() == ""  # finished: no more text


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_with_stop_strings(tok: Tokenizer, include: bool) -> None:
    rng = random.Random(99 + include)
    matched = 0
    for _ in range(800):
        out = random_ids(rng, tok, rng.randrange(1, 25))
        final = tok.decode(out)
        stops = [rng.choice(["the", "STOP", "\n", "🙂", "é", "river and", "\ufffd", "zz"])]
        if len(final) > 2 and rng.random() < 0.7:  # a substring of the text: spans tokens
            i = rng.randrange(len(final) - 1)
            stops.append(final[i : i + rng.randrange(1, 6)])
        want_text, want_stop = expected_stop(final, stops, include)
        max_hold = max(map(len, stops)) - 1

        d = IncrementalDetokenizer(
            tok, [BOS_TOKEN_ID], stop=stops, include_stop_str_in_output=include
        )
        emitted, fed = "", []
        for chunk in chunks(rng, out):
            delta = d.update(chunk)
            fed += chunk
            emitted += delta
            assert emitted == d.output_text
            if d.stop_matched is not None:
                break
            so_far = tok.decode(fed)
            if not so_far.endswith("\ufffd"):  # (c) the holdback is a bounded stop prefix
                held = so_far[len(emitted) :]
                assert so_far.startswith(emitted) and len(held) <= max_hold
                assert held == "" or any(s.startswith(held) for s in stops)
        else:
            emitted += d.finish()
        assert (emitted, d.stop_matched) == (want_text, want_stop), (final, stops)
        assert emitted == d.output_text
        matched += want_stop is not None
        if d.stop_matched is not None:
            assert d.update([ord("a")]) == "" and d.finish() == ""  # stopped: nothing more
    assert matched > 400  # the property test did exercise stop strings


def test_batching_does_not_change_the_result(tok: Tokenizer) -> None:
    ids = tok.encode("abc the forest 🙂 STOP and", add_special_tokens=False)
    results = set()
    for n in (1, 2, 3, len(ids)):
        d = IncrementalDetokenizer(tok, [], stop=["forest", "the forest 🙂 S"])
        text = "".join(d.update(ids[i : i + n]) for i in range(0, len(ids), n))
        results.add((text, d.stop_matched))
    # "forest" completes first in the text, even when one update brings both stop strings.
    assert results == {("abc the ", "forest")}


def test_stop_string_spanning_tokens_and_holdback(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, tok.encode("Hi"), stop=["END!"])
    deltas = [d.update([ord(c)]) for c in "ok EN"]
    assert deltas == ["o", "k", " ", "", ""]  # "E", "EN" could start "END!": held
    assert d.update([ord("x")]) == "ENx"  # "ENx" cannot: released
    assert d.update([ord(c) for c in "E"]) == ""
    assert d.update([ord("N")]) == "" and d.update([ord("D")]) == ""
    assert d.update([ord("!"), ord("z")]) == ""
    assert (d.output_text, d.stop_matched) == ("ok ENx", "END!")


def test_include_stop_and_text_after_stop_dropped(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, [], stop=["\n\n"], include_stop_str_in_output=True)
    assert d.update(tok.encode("one\n\ntwo", add_special_tokens=False)) == "one\n\n"
    assert d.stop_matched == "\n\n" and d.output_text == "one\n\n"


def test_finish_flushes_held_text(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, [], stop=["abc"])
    assert d.update([ord("x"), ord("a"), ord("b")]) == "x"
    assert d.finish() == "ab" and d.stop_matched is None
    euro = list("€".encode())
    d = IncrementalDetokenizer(tok, [])
    assert d.update(euro[:2]) == ""  # incomplete: held
    assert d.finish() == "\ufffd"  # finish emits what decode gives
    d = IncrementalDetokenizer(tok, [])
    assert d.update(euro[:1]) == "" and d.update(euro[1:2]) == "" and d.update(euro[2:]) == "€"


def test_stop_found_before_a_pending_incomplete_char(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, [], stop=["go"])
    # "go" and the first byte of "🙂" arrive together: the stop is found without waiting.
    assert d.update([ord("g"), ord("o"), "🙂".encode()[0]]) == ""
    assert d.stop_matched == "go"


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    emoji = list("🙂".encode())
    d = IncrementalDetokenizer(tok, tok.encode("hi") + emoji[:2])
    text = d.update(emoji[2:]) + d.update([ord("a")]) + d.finish()
    assert text == tok.decode(emoji[2:] + [ord("a")])  # invariant (a) holds here too


def test_special_tokens_and_unknown_ids(tok: Tokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    assert eot is not None
    ids = [ord("a"), eot, 310, ord("b")]
    for skip in (True, False):
        d = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        text = "".join(d.update([i]) for i in ids) + d.finish()
        assert text == ("ab" if skip else "a<|eot_id|>b")


def test_long_output_keeps_a_small_window(tok: Tokenizer) -> None:
    calls: list[int] = []
    decode = tok.decode

    def counting_decode(ids: list[int], *args: object, **kwargs: object) -> str:
        calls.append(len(ids))
        return decode(ids, *args, **kwargs)  # type: ignore[arg-type]

    d = IncrementalDetokenizer(tok, tok.encode("prompt " * 100), stop=["never"])
    ids = tok.encode("the river and the forest " * 200, add_special_tokens=False)
    tok.decode = counting_decode  # type: ignore[method-assign,assignment]
    try:
        text = "".join(d.update([i]) for i in ids) + d.finish()
    finally:
        del tok.decode  # back to the class's method
    assert text == decode(ids)
    assert max(calls) <= 12 and len(d._ids) <= 40  # O(window) per step, not O(output)


def test_sentencepiece_keeps_the_leading_space(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "▁Hello": 2, "▁world": 3, "▁again": 4, "!": 5}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.normalizer = normalizers.Replace(" ", "▁")
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    spm = Tokenizer.from_pretrained(tmp_path)
    assert spm.decode([3, 4]) == "world again"  # decode alone strips the first space
    d = IncrementalDetokenizer(spm, [1, 2])
    text = "".join(d.update([i]) for i in (3, 4, 5)) + d.finish()
    assert text == " world again!"  # streamed in the prompt's context, as vLLM does


def test_rejects_empty_stop_string(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, [], stop=["ok", ""])


def test_token_display(tok: Tokenizer) -> None:
    assert token_display(tok, ord("A")) == "A"
    assert token_display(tok, tok.encode(" the", add_special_tokens=False)[0]) == " the"
    assert token_display(tok, BOS_TOKEN_ID) == "<|begin_of_text|>"
    assert token_display(tok, "€".encode()[0]) == "\ufffd"  # half a character
    assert token_display(tok, DEMO_VOCAB_SIZE + 3) == ""
