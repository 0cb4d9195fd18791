"""Structured outputs inside the engine core (in process, CPU, the demo model): grammars
compile off the busy loop and are cached, constrained and unconstrained requests share
steps (with async scheduling too: constrained steps chain, their sampling deferred until the
step before is applied, with the same tokens as without), a grammar that fails to compile
ends its request with an error, and an abort while compiling loses nothing."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from vserve.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from vserve.engine.core import EngineCore
from vserve.models.source import resolve_model_dir
from vserve.protocol.outputs import FinishReason
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams, StructuredOutput
from vserve.structured.grammar import json_schema

EOS = [296]
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module", params=[
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def demo(request: pytest.FixtureRequest) -> tuple[EngineCore, Tokenizer]:
    """The engine on CPU, and on CUDA (graphs, masks applied on the device) where there is
    one."""
    d = resolve_model_dir("demo")
    return EngineCore(EngineConfig(model=ModelConfig(model=str(d)),
                                   device=DeviceConfig(device=request.param),
                                   scheduler=SchedulerConfig(async_scheduling=True)), d), \
        Tokenizer.from_file(str(d / "tokenizer.json"))


def _run(core: EngineCore, reqs: dict[str, SamplingParams]) -> dict[str, tuple[list[int], Any]]:
    for rid, params in reqs.items():
        assert core.add_request(EngineCoreRequest(rid, [1, 2, 3], params, EOS,
                                                  time.time())) is None
    out: dict[str, tuple[list[int], Any]] = {}
    while core.has_unfinished_requests():
        for outs in core.step().values():
            for o in outs.unpack():
                toks, _ = out.get(o.request_id, ([], None))
                out[o.request_id] = (toks + list(o.new_token_ids), o.finish_reason)
    return out


def test_constrained_and_free_rows_share_steps(demo: tuple[EngineCore, Tokenizer]) -> None:
    core, tok = demo
    specs: dict[str, StructuredOutput | None] = {
        "json": json_schema(SCHEMA), "regex": StructuredOutput("regex", r"[ab]{2}-\d"),
        "choice": StructuredOutput("choice", '["yes", "no"]'), "free": None}
    reqs = {f"{kind}-{seed}": SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                                             structured=so)
            for seed in range(6) for kind, so in specs.items()}
    compiles = core.structured.compiles if core.structured else 0
    out = _run(core, reqs)
    assert set(out) == set(reqs)
    assert core.structured is not None
    assert core.structured.compiles - compiles <= 3  # one per distinct grammar, then cached
    for rid, (toks, finish) in out.items():
        text = tok.decode(toks)
        kind = rid.split("-")[0]
        if kind == "free":
            continue
        assert finish == FinishReason.STOP, (rid, text)
        if kind == "json":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(r"[ab]{2}-\d", text), text
        else:
            assert text in ("yes", "no")
    # Free rows ran unconstrained next to them, to their length or an EOS.
    for seed in range(6):
        toks, finish = out[f"free-{seed}"]
        assert finish == FinishReason.LENGTH and len(toks) == 40 or toks[-1] in EOS


def test_constrained_steps_chain_with_the_same_tokens_as_sync(
        demo: tuple[EngineCore, Tokenizer]) -> None:
    """Grammars, penalties and ``min_tokens`` read the output history, so their sampling
    waits until the step before is applied; their forward passes still chain. Seeded rows
    draw the same tokens as a synchronous engine, and grammars that complete while the next
    row is in flight end where they end without async scheduling."""
    core, _ = demo
    # A fixed, small cache: on CUDA the first engine holds most of the card's memory.
    sync = EngineCore(EngineConfig(model=core.config.model, device=core.config.device,
                                   cache=CacheConfig(num_kv_blocks=1024),
                                   scheduler=SchedulerConfig(async_scheduling=False)),
                      core.runner.model_dir)
    specs: dict[str, StructuredOutput | None] = {
        "json": json_schema(SCHEMA), "choice": StructuredOutput("choice", '["yes", "no"]'),
        "free": None}
    reqs = {f"{kind}-{seed}": SamplingParams(temperature=0.8, seed=seed, max_tokens=30,
                                             structured=so, logprobs=1 if seed == 1 else None)
            for seed in range(4) for kind, so in specs.items()}
    reqs["penalized"] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                       repetition_penalty=1.3, frequency_penalty=0.4)
    reqs["min-tokens"] = SamplingParams(temperature=0.7, seed=9, max_tokens=20, min_tokens=12)
    chained = [0]
    inner = core.scheduler.schedule_chained

    def count(sched):  # type: ignore[no-untyped-def]
        out = inner(sched)
        chained[0] += out is not None
        return out

    core.scheduler.schedule_chained = count  # type: ignore[method-assign]
    try:
        got = _run(core, reqs)
    finally:
        del core.scheduler.schedule_chained
    assert got == _run(sync, reqs)
    # Every step but the first could chain (no KV pressure); without deferred sampling none
    # of these would.
    assert chained[0] >= 20, chained


def test_compile_failure_is_an_error_ending(demo: tuple[EngineCore, Tokenizer]) -> None:
    core, _ = demo
    out = _run(core, {"bad": SamplingParams(max_tokens=5,
                                            structured=StructuredOutput("regex", "a(b")),
                      "good": SamplingParams(max_tokens=3)})
    assert out["bad"] == ([], FinishReason.ERROR)
    assert out["good"][1] == FinishReason.LENGTH


def test_abort_while_compiling(demo: tuple[EngineCore, Tokenizer]) -> None:
    core, _ = demo
    params = SamplingParams(max_tokens=5, structured=json_schema({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i}}}"} for i in range(1, 30)}}))
    assert core.add_request(EngineCoreRequest("slow", [1, 2], params, EOS, time.time())) is None
    outs = core.abort_requests(["slow"])
    assert [f.request_id for o in outs.values() for f in o.finished or []] == ["slow"]
    assert not core.has_unfinished_requests()
    assert core.add_request(EngineCoreRequest("slow", [1, 2], params, EOS, time.time())) is None
    assert core.add_request(EngineCoreRequest("slow", [1, 2], params, EOS, time.time())) \
        is not None  # a duplicate id is refused while the first compiles
    while core.has_unfinished_requests():
        core.step()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_benchmark_mode_draws_tokens_the_grammar_allows(async_scheduling: bool) -> None:
    """With ``benchmark_skip_compute`` a constrained row's fake token comes from its real
    bitmask (filled as in a real step), so the host's share of constrained decoding can be
    measured without a model (``benchmarks/engine_host.py --rows constrained``): every
    output follows its grammar, varied across rows, and a completed grammar stops its row."""
    d = resolve_model_dir("demo")
    core = EngineCore(EngineConfig(
        model=ModelConfig(model=str(d)),
        device=DeviceConfig(device="cpu", benchmark_skip_compute=True),
        scheduler=SchedulerConfig(async_scheduling=async_scheduling)), d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    choice = StructuredOutput("regex", r"(yes|no|maybe)")
    reqs = {f"json-{i}": SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                                        structured=json_schema(SCHEMA)) for i in range(8)}
    reqs |= {f"choice-{i}": SamplingParams(max_tokens=10, structured=choice) for i in range(4)}
    reqs["free"] = SamplingParams(max_tokens=12, ignore_eos=True)
    out = _run(core, reqs)
    assert set(out) == set(reqs)
    texts = {rid: tok.decode(toks) for rid, (toks, _) in out.items()}
    for i in range(4):
        assert texts[f"choice-{i}"] in ("yes", "no", "maybe")
        assert out[f"choice-{i}"][1] == FinishReason.STOP
    finished = 0
    for i in range(8):
        text, finish = texts[f"json-{i}"], out[f"json-{i}"][1]
        if finish == FinishReason.STOP:
            jsonschema.validate(json.loads(text), SCHEMA)
            finished += 1
        else:  # cut by max_tokens: still a prefix of a valid document
            assert finish == FinishReason.LENGTH and text.startswith("{"), text
    assert finished, texts
    assert len({texts[f"json-{i}"] for i in range(8)}) > 4, texts
    assert len(out["free"][0]) == 12
