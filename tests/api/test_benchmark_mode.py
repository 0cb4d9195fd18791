"""``vserve serve --benchmark-skip-compute`` end to end, through the official ``openai``
client: no model arithmetic, fake tokens of the requested length, logprob rows where asked,
and under a JSON schema tokens the grammar allows (its masks are real), so that front-end
and engine-host benchmarks can run structured requests too."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from helpers.serve import ServeProcess, serve

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--benchmark-skip-compute") as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_fake_tokens_of_the_requested_length(srv: ServeProcess,
                                             client: openai.OpenAI) -> None:
    assert "BENCHMARK MODE" in srv.log()
    r = client.completions.create(model="demo", prompt="hello", max_tokens=40, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 40
    assert r.choices[0].finish_reason == "length"
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert len(lp.token_logprobs) == 40 and set(lp.token_logprobs) == {0.0}


def test_json_schema_rows_follow_their_grammar(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    texts = set()
    for seed in range(6):
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": f"item {seed}"}],
            max_tokens=120, seed=seed, response_format=fmt)  # type: ignore[arg-type]
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
        texts.add(choice.message.content)
    assert len(texts) > 1, texts  # varied, as a random model's tokens are
