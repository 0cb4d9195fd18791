"""The offline API on the demo model: sampling parameters, n, seeds, stops, chat, scripts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vserve import LLM, SamplingParams
from vserve.models.demo import build_demo_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = build_demo_model(tmp_path_factory.mktemp("demo") / "demo")
    with LLM(str(model_dir), block_size=4) as engine:
        yield engine


def ids(llm, text):
    return llm.get_tokenizer().encode(text)


def test_result_shape(llm):
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)
    assert len(out) == 1
    res = out[0]
    assert res.prompt == "Hello, my name is"
    assert res.prompt_token_ids == ids(llm, "Hello, my name is")
    comp = res.outputs[0]
    assert comp.index == 0 and comp.finish_reason in ("stop", "length")
    assert 1 <= len(comp.token_ids) <= 8
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids)


def test_same_seed_same_output_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate("The weather today", p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3
    batch = llm.generate(["Once upon", "The weather today", "A long prompt " * 10, "x"],
                         [others[0], p, others[1], others[2]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    unseeded = llm.generate(["The weather today"] * 4,
                            SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
    assert len({tuple(r.outputs[0].token_ids) for r in unseeded}) > 1


def test_n_shares_prompt_blocks(llm):
    prompt = "Shared prefix for every sample: " * 4
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # seeds seed+i differ
    stats = llm.engine_stats()
    # Children after the first found the prompt's full blocks in the cache.
    assert stats.prefix_cache_hits >= 2 * (len(ids(llm, prompt)) // 4 - 1) * 4


def test_max_tokens_min_tokens_and_ignore_eos(llm):
    tok = llm.get_tokenizer()
    greedy = llm.generate("abc", SamplingParams(temperature=0, max_tokens=40),
                          use_tqdm=False)[0].outputs[0]
    eos = llm.eos_token_ids
    # Force EOS with a bias: the request stops at once, unless min_tokens or ignore_eos.
    bias = {t: 100.0 for t in eos}
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, logit_bias=bias),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1 and out.token_ids[0] in eos
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, logit_bias=bias,
                                             min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 6
    assert all(t not in eos for t in out.token_ids[:5])
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=7, logit_bias=bias,
                                             ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert greedy.text == tok.decode(greedy.token_ids)


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=30,
                                                              ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_tok = base.token_ids[5]
    out = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok]),
        use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # A stop string taken from the middle of the greedy text: cut before it, not emitted.
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    out = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == text[: text.index(stop)]
    out = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True), use_tqdm=False)[0]
    assert out.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_penalties_and_filters_change_distribution(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = llm.generate("aaaa", greedy, use_tqdm=False)[0].outputs[0].token_ids
    rep = llm.generate("aaaa", greedy.clone(repetition_penalty=2.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    freq = llm.generate("aaaa", greedy.clone(frequency_penalty=2.0),
                        use_tqdm=False)[0].outputs[0].token_ids
    pres = llm.generate("aaaa", greedy.clone(presence_penalty=2.0),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert rep != plain and freq != plain and pres != plain
    assert len(set(freq)) >= len(set(plain))
    # top_k=1 is greedy whatever the temperature; a tiny top_p or min_p=1 as well.
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5,
              top_p=1e-6), SamplingParams(temperature=1.5, min_p=1.0)):
        out = llm.generate("aaaa", p.clone(max_tokens=30, ignore_eos=True, seed=3),
                           use_tqdm=False)[0].outputs[0].token_ids
        assert out == plain


def test_logprobs_are_consistent(llm):
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=6, logprobs=5,
                                               ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == 6
    total = 0.0
    for tok, row in zip(comp.token_ids, comp.logprobs):
        assert tok in row and row[tok].rank == 1  # greedy: the chosen token is the best
        assert 5 <= len(row) <= 6
        assert max(lp.logprob for lp in row.values()) == row[tok].logprob
        assert all(lp.decoded_token is not None for lp in row.values())
        total += row[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total)


def test_chat_uses_template(llm):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    rendered = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt == rendered
    assert out.prompt_token_ids == llm.get_tokenizer().encode(rendered,
                                                              add_special_tokens=False)
    assert len(out.outputs[0].token_ids) >= 1


def test_bad_inputs_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": [5] * 5000}, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompts but"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError):
        LLM("demo", no_such_option=1)  # type: ignore[call-arg]
    # The engine still works after all of that.
    assert llm.generate("ok", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0]


SCRIPT = """
import torch
from vserve import LLM, SamplingParams
torch.zeros(1)  # the caller initialized torch (and CUDA, where there is one) first
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
llm = LLM({model!r}, device="cpu")
out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                   use_tqdm=False)
print("TOKENS", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["no-main-guard", "main-guard"])
def test_script_with_and_without_main_guard(tmp_path, guarded):
    model_dir = build_demo_model(tmp_path / "demo")
    body = SCRIPT.format(model=str(model_dir))
    if guarded:
        body = "def main():\n" + textwrap.indent(body, "    ") + \
            "\nif __name__ == '__main__':\n    main()\n"
    script = tmp_path / "script.py"
    script.write_text(body)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 4" in proc.stdout
    assert "bootstrapping phase" not in proc.stderr


def test_llm_created_in_a_short_lived_thread_keeps_its_engine(tmp_path):
    """The engine follows its parent *process*: a thread that created the LLM may end."""
    import threading
    import time

    model_dir = build_demo_model(tmp_path / "demo")
    holder: list[LLM] = []
    t = threading.Thread(target=lambda: holder.append(LLM(str(model_dir), device="cpu")))
    t.start()
    t.join(120)
    assert holder, "the LLM was not created"
    llm = holder[0]
    try:
        time.sleep(1.5)  # longer than the parent-death poll: a wrongly armed engine is gone
        assert llm.launcher.dead_engines() == []
        out = llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
