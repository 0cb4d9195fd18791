"""The OpenAI-compatible API through the official ``openai`` client, against a real
``vserve serve demo --api-server-count 2``.

The demo model has random weights, so these tests check structure, counts and consistency:
greedy decoding (temperature 0) is deterministic, and ``logit_bias`` forces chosen tokens
(id 120 is "x", 296 is the EOS token), which makes stops, penalties and min/max tokens
observable exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from helpers.serve import ServeProcess, serve

from vserve.api.responses import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse

KEYS = ("key-one", "key-two")
WINDOW = 256
X, EOS = 120, 296
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--api-server-count", "2", "--max-model-len", str(WINDOW),
               "--served-model-name", "demo", "demo-alias", "--api-key", *KEYS) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS[1], max_retries=0,
                         timeout=60)


def tokenize(srv: ServeProcess, **body: Any) -> list[int]:
    r = httpx.post(srv.base_url + "/tokenize", json=body,
                   headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 200, r.text
    tokens: list[int] = r.json()["tokens"]
    return tokens


def greedy(client: openai.OpenAI, **kw: Any) -> str:
    kw.setdefault("max_tokens", 12)
    r = client.completions.create(model="demo", prompt=PROMPT, temperature=0, **kw)
    return r.choices[0].text


# ---- models, auth ---------------------------------------------------------------------------

def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo", "demo-alias"]
    assert client.models.retrieve("demo-alias").id == "demo-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_wrong_key_is_401(srv: ServeProcess) -> None:
    # (A missing key is tested with raw HTTP: this client refuses to send none.)
    for key in ("wrong", KEYS[0] + "x", KEYS[0][:-1]):
        bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="demo", prompt="hi", max_tokens=1)
        assert e.value.status_code == 401
    ok = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS[0], max_retries=0)
    assert ok.completions.create(model="demo", prompt="hi", max_tokens=1).choices


def test_no_cors_headers_by_default(srv: ServeProcess) -> None:
    r = httpx.get(srv.base_url + "/v1/models", headers={
        "Origin": "http://app.example", "Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert e.value.body["type"] == "not_found_error"  # type: ignore[index]
    assert e.value.body["param"] == "model"  # type: ignore[index]


def test_served_model_alias(client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo-alias", prompt="hi", max_tokens=2)
    assert r.model == "demo-alias"


# ---- completions ----------------------------------------------------------------------------

def test_completion_usage_and_schema(srv: ServeProcess, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "client-chosen-1"})
    assert raw.headers["x-request-id"] == "client-chosen-1"
    body = CompletionResponse.model_validate(raw.http_response.json())  # docs match reality
    assert body.id == "cmpl-client-chosen-1"
    r = raw.parse()
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenize(srv, prompt=PROMPT))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_prompt_forms_and_n(srv: ServeProcess, client: openai.OpenAI) -> None:
    ids = tokenize(srv, prompt=PROMPT)
    by_text = greedy(client)
    r = client.completions.create(model="demo", prompt=ids, temperature=0, max_tokens=12)
    assert r.choices[0].text == by_text  # token ids and text give the same prompt
    r = client.completions.create(model="demo", prompt=[PROMPT, "hello"], n=2, max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage is not None
    prompt_tokens = len(ids) + len(tokenize(srv, prompt="hello"))
    assert r.usage.prompt_tokens == prompt_tokens  # each prompt counted once, not per choice
    assert r.usage.completion_tokens == 4 * 3
    r = client.completions.create(model="demo", prompt=[ids, ids[:3]], temperature=0,
                                  max_tokens=12)
    assert r.choices[0].text == by_text and len(r.choices) == 2
    assert r.usage is not None and r.usage.prompt_tokens == len(ids) + 3


def test_max_tokens_defaults_to_the_window(srv: ServeProcess, client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo", prompt=PROMPT, extra_body={"ignore_eos": True})
    n = len(tokenize(srv, prompt=PROMPT))
    assert r.usage is not None and r.usage.completion_tokens == WINDOW - n
    assert r.choices[0].finish_reason == "length"


def test_window_errors_name_both_numbers(srv: ServeProcess, client: openai.OpenAI) -> None:
    n = len(tokenize(srv, prompt=PROMPT))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=WINDOW)
    msg = e.value.body["message"]  # type: ignore[index]
    assert str(n) in msg and str(WINDOW) in msg and e.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="a" * WINDOW, max_tokens=1)
    msg = e.value.body["message"]  # type: ignore[index]
    assert str(WINDOW + 1) in msg and str(WINDOW) in msg  # WINDOW bytes + BOS


def test_echo_and_logprobs(srv: ServeProcess, client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and tok in top and 3 <= len(top) <= 4  # top 3 + the chosen token
    assert lp.text_offset == sorted(lp.text_offset)
    n = len(tokenize(srv, prompt=PROMPT))
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, logprobs=2,
                                  echo=True, temperature=0, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text == PROMPT + greedy(client, max_tokens=5, extra_body={"ignore_eos": True})
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == n + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the BOS has none
    assert all(v is not None for v in lp.token_logprobs[1:])
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, echo=True)
    assert r.choices[0].text.startswith(PROMPT)
    assert r.usage is not None and r.usage.prompt_tokens == n  # echo is not output


def test_prompt_logprobs_extra(srv: ServeProcess, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 1})
    choice = raw.http_response.json()["choices"][0]
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(tokenize(srv, prompt=PROMPT)) and rows[0] is None
    assert all(1 <= len(row) <= 2 for row in rows[1:])


def test_suffix_and_best_of_are_rejected(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="hi", suffix="!", max_tokens=1)
    assert e.value.status_code == 400 and e.value.body["param"] == "suffix"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="hi", best_of=2, max_tokens=1)
    assert e.value.body["param"] == "best_of"  # type: ignore[index]


# ---- sampling parameters --------------------------------------------------------------------

def test_greedy_equivalents_and_seeds(client: openai.OpenAI) -> None:
    base = greedy(client)
    assert greedy(client) == base
    for kw in ({"extra_body": {"top_k": 1}}, {"top_p": 1e-6},
               {"extra_body": {"min_p": 1.0}}):
        r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12,
                                      temperature=1.0, **kw)  # type: ignore[arg-type]
        assert r.choices[0].text == base, kw

    def sample(seed: int) -> str:
        r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=16, seed=seed,
                                      temperature=1.0, extra_body={"ignore_eos": True})
        return r.choices[0].text

    assert sample(7) == sample(7) and sample(7) != sample(8)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=16, seed=7, n=2,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == sample(7) and r.choices[1].text == sample(8)  # seed + i


def test_logit_bias_and_penalties(client: openai.OpenAI) -> None:
    assert greedy(client, logit_bias={str(X): 100}) == "x" * 12
    # Biasing "x" just enough to win every greedy step, a penalty on repeated tokens must
    # make something else win somewhere. Which bias is "just enough" depends on the random
    # weights, so try a range: a penalty that is not wired to the engine never changes it.
    penalties: dict[str, dict[str, Any]] = {
        "frequency": {"frequency_penalty": 1.0}, "presence": {"presence_penalty": 2.0},
        "repetition": {"extra_body": {"repetition_penalty": 2.0}}}
    changed = dict.fromkeys(penalties, False)
    tried = 0
    for bias in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0):
        if greedy(client, logit_bias={str(X): bias}) != "x" * 12:
            continue
        tried += 1
        for name, kw in penalties.items():
            changed[name] |= greedy(client, logit_bias={str(X): bias}, **kw) != "x" * 12
    assert tried and all(changed.values()), changed
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, logit_bias={"100000": 1})
    assert e.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        greedy(client, logit_bias={"x": 1})


def test_stops_eos_and_min_tokens(client: openai.OpenAI) -> None:
    def run(**kw: Any) -> Any:
        return client.completions.create(model="demo", prompt=PROMPT, max_tokens=10, **kw)

    r = run(logit_bias={str(X): 100}, stop="xxx")
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")
    assert r.choices[0].model_extra["stop_reason"] == "xxx"  # type: ignore[index]
    r = run(logit_bias={str(X): 100}, stop=["zz", "xxx"],
            extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == "xxx" and r.usage is not None and r.usage.completion_tokens == 3
    r = run(logit_bias={str(X): 100}, extra_body={"stop_token_ids": [X]})
    assert r.choices[0].finish_reason == "stop" and r.usage and r.usage.completion_tokens == 1
    r = run(logit_bias={str(EOS): 100})
    assert r.choices[0].finish_reason == "stop" and r.usage and r.usage.completion_tokens == 1
    r = run(logit_bias={str(EOS): 100}, extra_body={"min_tokens": 3})
    assert r.usage and r.usage.completion_tokens == 4  # EOS only after 3 tokens
    r = run(logit_bias={str(EOS): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 10


def test_invalid_sampling_values_are_400(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"), ({"logprobs": 21}, "logprobs"),
        ({"extra_body": {"min_p": 2}}, "min_p"), ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"min_tokens": 5}, "max_tokens": 2}, "min_tokens"),
        ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ]
    for kw, param in cases:
        kw.setdefault("max_tokens", 4)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="demo", prompt="hi", **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)  # type: ignore[index]


# ---- chat -----------------------------------------------------------------------------------

MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Say something."},
                       {"role": "assistant", "content": "Something."},
                       {"role": "user", "content": [{"type": "text", "text": "Again"},
                                                    {"type": "text", "text": "please"}]}]


def test_chat_usage_template_and_schema(srv: ServeProcess, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_completion_tokens=6,
        extra_body={"ignore_eos": True})
    ChatCompletionResponse.model_validate(raw.http_response.json())
    r = raw.parse()
    assert r.id.startswith("chatcmpl-") and r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(tokenize(srv, messages=MESSAGES))
    joined = [*MESSAGES[:3], {"role": "user", "content": "Again\nplease"}]
    assert tokenize(srv, messages=joined) == tokenize(srv, messages=MESSAGES)
    no_gen = tokenize(srv, messages=MESSAGES, add_generation_prompt=False)
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1,
                                       extra_body={"add_generation_prompt": False})
    assert r.usage is not None and r.usage.prompt_tokens == len(no_gen)
    assert len(no_gen) < len(tokenize(srv, messages=MESSAGES))


def test_chat_n_and_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=MESSAGES, n=3, max_tokens=4,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens == 12
    for choice in r.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 4
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.bytes == list(entry.token.encode())
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=MESSAGES, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"  # type: ignore[index]


def test_chat_rejects_unsupported(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    rejected: list[tuple[dict[str, Any], str]] = [
        # tool_choice auto needs --enable-auto-tool-choice (tests/api/test_structured_outputs.py
        # serves it), and any tool_choice needs tools.
        ({"tools": [tool], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"functions": [{"name": "f"}]}, "functions"), ({"store": True}, "store"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ]
    for kw, param in rejected:
        kw.setdefault("messages", MESSAGES)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", max_tokens=1, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)  # type: ignore[index]
    # Accepted: informational fields and the no-op forms.
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1,
                                       user="u1", metadata={"k": "v"},
                                       response_format={"type": "text"})
    assert r.choices
    # Tools without a tool_choice on a server without auto tool choice: shown to the
    # template, the output is content.
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3,
                                       tools=[tool])  # type: ignore[list-item]
    assert r.choices[0].message.tool_calls is None


# ---- streaming ------------------------------------------------------------------------------

def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "demo", "prompt": PROMPT, "max_tokens": 20,
                          "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    content = chunks[:-1]
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert all(c.choices[0].text for c in content[:-1])  # no empty non-final chunk
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
        "length"]
    plain = list(client.completions.create(stream=True, **kw))
    assert all(c.usage is None for c in plain)


def test_chat_stream_n2(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "demo", "messages": MESSAGES, "max_tokens": 8, "seed": 3,
                          "n": 2, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                  stream_options={"include_usage": True}, **kw))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    texts = {0: "", 1: ""}
    finishes: dict[int, list[str | None]] = {0: [], 1: []}
    first_seen: dict[int, Any] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        first_seen.setdefault(choice.index, choice.delta)
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index].append(choice.finish_reason)
    assert all(d.role == "assistant" for d in first_seen.values())
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    for index in (0, 1):
        assert finishes[index][-1] == "length" and not any(finishes[index][:-1])
