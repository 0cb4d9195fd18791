"""The model's generation_config.json supplies sampling defaults (``--generation-config``):
fields a request leaves unset take the model's values, fields it sets win, ``vserve`` turns
it off; the same for ``LLM.generate`` without sampling params."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from helpers.serve import serve

from vserve.frontend.generation_defaults import load_sampling_defaults
from vserve.models.source import resolve_model_dir

GEN = {"temperature": 0.0, "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.1,
       "max_new_tokens": 5, "do_sample": True, "eos_token_id": [296, 297]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(resolve_model_dir("demo"), d)
    (d / "generation_config.json").write_text(json.dumps(GEN))
    return d


def test_defaults_are_read_from_the_file(model_dir: Path, tmp_path: Path) -> None:
    assert load_sampling_defaults(model_dir, "auto") == {
        "temperature": 0.0, "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.1,
        "max_tokens": 5}
    assert load_sampling_defaults(model_dir, "vserve") == {}
    assert load_sampling_defaults(model_dir, str(model_dir))["max_tokens"] == 5
    assert load_sampling_defaults(tmp_path, "auto") == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_sampling_defaults(model_dir, str(tmp_path))


def _complete(base: str, **body: object) -> dict:
    r = httpx.post(base + "/v1/completions", json={"prompt": "The fox", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_served_requests_take_the_models_defaults(model_dir: Path) -> None:
    with serve(str(model_dir), "--max-model-len", "64") as srv:
        assert "sampling defaults for unset request fields (--generation-config auto): " \
               "temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.1, max_tokens=5" \
               in srv.log()
        a, b = _complete(srv.base_url), _complete(srv.base_url)
        # max_new_tokens=5 and greedy (temperature 0): five tokens, twice the same.
        assert a["usage"]["completion_tokens"] <= 5 and a["choices"][0]["text"] == \
            b["choices"][0]["text"]
        assert a["usage"]["completion_tokens"] == 5 or a["choices"][0]["finish_reason"] == "stop"
        # What a request sets wins.
        c = _complete(srv.base_url, max_tokens=9, temperature=1.0, top_k=0, top_p=1.0,
                      ignore_eos=True)
        assert c["usage"]["completion_tokens"] == 9
        texts = {_complete(srv.base_url, max_tokens=20, temperature=1.0, top_k=0,
                           top_p=1.0)["choices"][0]["text"] for _ in range(3)}
        assert len(texts) > 1  # sampled, not the model's greedy default
    with serve(str(model_dir), "--max-model-len", "64", "--generation-config", "vserve") as srv:
        assert "(--generation-config vserve): none" in srv.log()
        outs = [_complete(srv.base_url, ignore_eos=True) for _ in range(2)]
        # vserve's defaults: the room the window leaves, sampled at temperature 1.
        assert all(o["usage"]["completion_tokens"] > 5 for o in outs)
        assert outs[0]["choices"][0]["text"] != outs[1]["choices"][0]["text"]


def test_llm_generate_without_params_uses_them(model_dir: Path) -> None:
    from vserve import LLM

    llm = LLM(str(model_dir), max_model_len=64)
    try:
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 3, 5)
        (out,) = llm.generate("The fox", use_tqdm=False)
        assert len(out.outputs[0].token_ids) <= 5
    finally:
        llm.shutdown()
    llm = LLM(str(model_dir), max_model_len=64, generation_config="vserve")
    try:
        assert llm.get_default_sampling_params().temperature == 1.0
    finally:
        llm.shutdown()
