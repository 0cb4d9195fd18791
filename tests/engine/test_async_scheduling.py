"""Async scheduling: the engine launches the next decode step before it reads this one's
tokens (``Scheduler.schedule_chained`` + ``EngineCore.step``).

On CPU a chained step takes its input tokens from the step before it (already complete), so
these tests pin down the scheduling side with the real model: the same tokens, finish
reasons and logprobs as without async scheduling, whatever happens between steps (new
requests, aborts, stop tokens, preemption), no KV block leaked, and chaining really
happening. With ``device == "cuda"`` (GPU machines) the same tests check the device side:
tokens of a step in flight gathered from ``last_tokens`` by the next one.
``vserve serve --async-scheduling`` end to end at the bottom.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.models import make_tiny_model
from helpers.serve import serve

from vserve.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from vserve.core.request import Request
from vserve.core.scheduler import Scheduler
from vserve.engine.core import EngineCore
from vserve.frontend.tokenizer import Tokenizer
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def device(request):
    """On CUDA the chained steps are decode graphs reading the previous graph's tokens."""
    return request.param


def _core(model_dir, async_scheduling: bool, num_kv_blocks: int = 512,
          block_size: int = 4, max_num_seqs: int = 16, device: str = "cpu") -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=256),
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                  async_scheduling=async_scheduling),
        device=DeviceConfig(device=device),
    )
    core = EngineCore(config, model_dir)
    assert core.async_scheduling is async_scheduling
    return core


def _count_chained(core: EngineCore) -> list[int]:
    """Counts the chained steps ``core`` launches (``[n]``, updated in place)."""
    count = [0]
    inner = core.scheduler.schedule_chained

    def wrapper(sched):  # type: ignore[no-untyped-def]
        out = inner(sched)
        count[0] += out is not None
        return out

    core.scheduler.schedule_chained = wrapper  # type: ignore[method-assign]
    return count


Actions = dict[int, Callable[[EngineCore], Any]]


def _run(core: EngineCore, requests: list[tuple[str, list[int], SamplingParams]],
         actions: Actions | None = None) -> dict[str, dict[str, Any]]:
    """Step until done; ``actions[k]`` runs after the k-th ``step()``. Returns per request
    its tokens, logprobs, finish and stop reasons."""
    res: dict[str, dict[str, Any]] = {}

    def add(rid: str, prompt: list[int], params: SamplingParams) -> None:
        res[rid] = {"tokens": [], "logprobs": [], "finish": None, "stop": None}
        assert core.add_request(EngineCoreRequest(rid, prompt, params, [1], time.time())) is None

    for r in requests:
        add(*r)
    k = 0
    while core.has_unfinished_requests():
        for outs in core.step().values():
            for o in outs.unpack():
                entry = res[o.request_id]
                assert entry["finish"] is None, f"{o.request_id}: output after it finished"
                entry["tokens"] += o.new_token_ids
                if o.new_logprobs is not None:
                    entry["logprobs"].append((o.new_logprobs.token_ids,
                                              [round(x, 4) for x in o.new_logprobs.logprobs[0]]))
                if o.finish_reason is not None:
                    entry["finish"], entry["stop"] = o.finish_reason, o.stop_reason
        k += 1
        if actions and k in actions:
            for rid, prompt, params in actions[k](core) or []:
                add(rid, prompt, params)
    kv = core.scheduler.kv_cache_manager
    assert kv.num_free_blocks == core.num_kv_blocks - 1, "KV blocks leaked"
    assert not core.has_unfinished_requests()
    return res


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]


def _mixed_requests() -> list[tuple[str, list[int], SamplingParams]]:
    p = _prompts(1, [5, 9, 17, 3, 30, 8])
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        ("greedy-long", p[0], SamplingParams(max_tokens=40, **greedy)),
        ("greedy-short", p[1], SamplingParams(max_tokens=3, **greedy)),
        ("seeded", p[2], SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7,
                                        ignore_eos=True)),
        ("logprobs", p[3], SamplingParams(max_tokens=20, logprobs=2, **greedy)),
        ("top-k", p[4], SamplingParams(max_tokens=33, temperature=0.7, top_k=5, seed=3,
                                       ignore_eos=True)),
        ("one-token", p[5], SamplingParams(max_tokens=1, **greedy)),
    ]


def test_same_outputs_as_sync_and_steps_are_chained(model_dir, device):
    sync = _run(_core(model_dir, False, device=device), _mixed_requests())
    core = _core(model_dir, True, device=device)
    chained = _count_chained(core)
    got = _run(core, _mixed_requests())
    assert got == sync
    # Every step of unconstrained requests chains (on CUDA too: tokens of greedy steps stay
    # on the device, the others' come back before the next step is launched).
    assert chained[0] >= 15, chained
    assert [len(sync[r]["tokens"]) for r in ("greedy-long", "greedy-short", "one-token")] \
        == [40, 3, 1]


def test_stop_tokens_and_penalties(model_dir, device):
    """A stop token seen while the next step is in flight: that step's row is dropped and
    nothing follows the stop. Penalties read the output history: their steps chain with
    sampling deferred until the step before is applied, and give the same tokens."""
    p = _prompts(2, [6, 11, 4])
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    probe = _run(_core(model_dir, False, device=device), [("a", p[0], free), ("b", p[1], free)])
    stop_a = probe["a"]["tokens"][7]  # stops at its first occurrence, at index <= 7
    stop_b = probe["b"]["tokens"][12]
    reqs = [
        ("a", p[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                   stop_token_ids=[stop_a])),
        ("b", p[1], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                   stop_token_ids=[stop_b])),
    ]
    sync = _run(_core(model_dir, False, device=device), reqs)
    core = _core(model_dir, True, device=device)
    chained = _count_chained(core)
    got = _run(core, reqs)
    assert got == sync and chained[0] > 0
    assert got["a"]["finish"] == sync["a"]["finish"] and got["a"]["stop"] == stop_a
    assert got["a"]["tokens"][-1] == stop_a and len(got["a"]["tokens"]) <= 8

    penalized = [("pen", p[2], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                              repetition_penalty=1.3, frequency_penalty=0.5))]
    core = _core(model_dir, True, device=device)
    chained = _count_chained(core)
    assert _run(core, penalized) == _run(_core(model_dir, False, device=device), penalized)
    assert chained[0] >= 10, chained


def test_arrivals_and_aborts_between_steps(model_dir, device):
    """New requests and aborts land while a chained step is in flight; the pipeline drains
    and every request's tokens are still those it gets alone, with nothing leaked."""
    p = _prompts(3, [7, 12, 5, 9, 14])
    greedy = dict(temperature=0.0, ignore_eos=True)
    base = [("x", p[0], SamplingParams(max_tokens=30, **greedy)),
            ("y", p[1], SamplingParams(max_tokens=30, **greedy)),
            ("z", p[2], SamplingParams(max_tokens=30, **greedy))]
    late = [("late1", p[3], SamplingParams(max_tokens=10, **greedy)),
            ("late2", p[4], SamplingParams(max_tokens=15, logprobs=1, **greedy))]

    def actions() -> Actions:
        return {
            4: lambda core: (core.abort_requests(["y"]), [late[0]])[1],
            9: lambda core: [late[1]],
            12: lambda core: core.abort_requests(["z"]) and None,
        }

    sync = _run(_core(model_dir, False, device=device), base, actions())
    core = _core(model_dir, True, device=device)
    chained = _count_chained(core)
    got = _run(core, base, actions())
    # Aborted requests: the same tokens up to the abort (no row of the in-flight step leaks).
    assert got["y"]["tokens"] == sync["y"]["tokens"] and 0 < len(got["y"]["tokens"]) < 30
    for rid in ("x", "late1", "late2"):
        assert got[rid] == sync[rid], rid
    alone = _run(_core(model_dir, True, device=device), [late[0]])
    assert got["late1"]["tokens"] == alone["late1"]["tokens"]
    assert chained[0] > (10 if device == "cpu" else 5), chained  # late2 asks for logprobs


def test_arrivals_and_finishes_every_step_keep_the_chain(model_dir, device):
    """Production churn: a request arrives at every step and requests finish every few
    steps (different lengths, stop tokens, seeded sampling). Each step still chains behind
    the one in flight — arrivals join it as prefill rows, finished rows are dropped — and
    every request's tokens, logprobs and finish equal the synchronous engine's."""
    rng = random.Random(11)
    prompts = _prompts(12, [rng.randrange(2, 24) for _ in range(40)])
    greedy = dict(temperature=0.0, ignore_eos=True)

    def request(i: int) -> tuple[str, list[int], SamplingParams]:
        kind = i % 4
        if kind == 0:
            params = SamplingParams(max_tokens=3 + i % 7, **greedy)
        elif kind == 1:
            params = SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True)
        elif kind == 2:
            params = SamplingParams(max_tokens=9, logprobs=1, **greedy)
        else:
            params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[
                prompts[i][0], 101, 7])
        return (f"c{i}", prompts[i], params)

    first = [request(i) for i in range(4)]

    def actions() -> Actions:
        return {k: (lambda i: lambda core: [request(i)])(k + 3) for k in range(1, 37)}

    sync = _run(_core(model_dir, False, device=device), first, actions())
    core = _core(model_dir, True, device=device)
    chained = _count_chained(core)
    steps = [0]
    inner = core.step

    def counting_step():  # type: ignore[no-untyped-def]
        steps[0] += 1
        return inner()

    core.step = counting_step  # type: ignore[method-assign]
    got = _run(core, first, actions())
    assert got == sync
    finished_early = [r for r, v in got.items() if len(v["tokens"]) < 20]
    assert len(finished_early) > 20  # finishes really happened all along
    # Arrivals and finishes no longer drain the pipeline: nearly every step chains.
    assert chained[0] >= 0.8 * steps[0], (chained, steps)


def test_preemption_with_async_scheduling(model_dir, device):
    """A cache too small for every request: lookahead slots run out, chaining stops, the
    normal schedule preempts; tokens still match the sync engine's."""
    p = _prompts(4, [20, 20, 20, 20])
    reqs = [(f"r{i}", p[i], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
            for i in range(4)]  # 4 x 80 tokens in a cache of 64 x 4
    sync_core = _core(model_dir, False, num_kv_blocks=64, device=device)
    sync = _run(sync_core, reqs)
    core = _core(model_dir, True, num_kv_blocks=64, device=device)
    chained = _count_chained(core)
    got = _run(core, reqs)
    assert got == sync
    assert core.stats().num_preemptions > 0 and chained[0] > 0


# ---- the scheduler's side -------------------------------------------------------------------
def _sched(max_model_len: int = 64, num_blocks: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(), CacheConfig(block_size=4), num_blocks, max_model_len)


def _req(rid: str, n: int, max_tokens: int = 100) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens), [])


def _decode_step(s: Scheduler, tokens: dict[str, int]):  # type: ignore[no-untyped-def]
    """Schedule + apply one normal step, sampling ``tokens``; returns the next step."""
    from vserve.core.sched_output import ModelRunnerOutput

    out = s.schedule()
    ro = ModelRunnerOutput(sampled_token_ids={x.request.request_id: tokens[x.request.request_id]
                                              for x in out.scheduled if x.samples})
    s.update_from_output(out, ro)
    return s.schedule()


def test_schedule_chained_rows_and_lookahead_blocks():
    s = _sched()
    s.add_request(_req("a", 7))  # positions 0..6; the first decode computes position 7
    s.add_request(_req("b", 4))
    step = _decode_step(s, {"a": 50, "b": 51})
    assert [x.num_new_tokens for x in step.scheduled] == [1, 1]
    a, b = (x.request for x in step.scheduled)
    # Block id lists are shared and grow in place: the runner has consumed ``step`` by the
    # time the engine chains.
    held_before = len(step.scheduled[0].block_ids)
    chained = s.schedule_chained(step)
    assert chained is not None and chained.chained
    assert [x.request for x in chained.scheduled] == [a, b]
    assert all(x.num_ahead == 1 and x.num_new_tokens == 1 for x in chained.scheduled)
    # a computes position 7 now and 8 in the chained step: block 2 is held for it already.
    assert held_before == 2 and len(chained.scheduled[0].block_ids) == 3
    # Only blocks full of known tokens are registered for prefix caching: positions 0..7
    # (7 prompt tokens and the token sampled last step), not the lookahead block.
    assert len(a.block_hashes) == 2 and a.num_tokens == 8


@pytest.mark.parametrize("case", ["none", "waiting", "max_tokens", "max_model_len",
                                  "partial", "no_blocks"])
def test_schedule_chained_plans_around_churn(case):
    """A chained step is planned whatever joins or leaves the batch: waiting requests are
    admitted as prefill rows, a step that was itself a mix chains on, rows that surely
    finish with the in-flight token are left out, and only running out of blocks (which
    would need a preemption) refuses."""
    # a: 9 prompt tokens and 1 output; the step computes position 9 and samples token 11.
    s = _sched(max_model_len=11 if case == "max_model_len" else 64)
    s.add_request(_req("a", 9, max_tokens=2 if case == "max_tokens" else 100))
    if case == "no_blocks":
        # 3 usable blocks of 4: a (8 tokens) holds 2, b (4 tokens) 1; a's chained row
        # would need a fourth.
        s = _sched(max_model_len=12, num_blocks=4)
        s.add_request(_req("a", 7))
        s.add_request(_req("b", 3))
    step = _decode_step(s, {"a": 50, "b": 51})
    if case == "waiting":
        s.add_request(_req("w", 3))
    elif case == "partial":
        s.add_request(_req("w", 3))
        step = s.schedule()  # a decodes, w prefills: a mixed step in flight
    chained = s.schedule_chained(step)
    if case in ("max_tokens", "max_model_len", "no_blocks"):
        assert chained is None
        return
    assert chained is not None and chained.chained
    rows = [(x.request.request_id, x.num_ahead, x.num_new_tokens, x.sample)
            for x in chained.scheduled]
    expected = {"none": [("a", 1, 1, True)],
                "waiting": [("a", 1, 1, True), ("w", 0, 3, True)],
                "partial": [("a", 1, 1, True), ("w", 3, 1, True)]}[case]
    assert rows == expected


# ---- end to end ------------------------------------------------------------------------------
def test_serve_with_async_scheduling(model_dir):
    """``vserve serve --async-scheduling`` on CPU: the engine says it is on, and greedy
    completions through the OpenAI client equal the in-process sync engine's tokens."""
    import openai

    prompts = _prompts(5, [6, 10, 3])
    sync = _run(_core(model_dir, False), [
        (str(i), pr, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        for i, pr in enumerate(prompts)])
    tok = Tokenizer.from_pretrained(model_dir)
    with serve(str(model_dir), "--device", "cpu", "--async-scheduling",
               "--max-model-len", "256") as srv:
        assert "async scheduling on" in srv.log()
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        for i, pr in enumerate(prompts):
            c = client.completions.create(model=str(model_dir), prompt=pr, max_tokens=12,
                                          temperature=0.0, extra_body={"ignore_eos": True})
            assert c.usage is not None and c.usage.completion_tokens == 12
            assert c.choices[0].text == tok.decode(sync[str(i)]["tokens"]), i
