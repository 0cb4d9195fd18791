"""Scheduler, driven by a fake model runner that simulates the paged KV cache.

The fake writes every scheduled token into a simulated cache through the step's block
tables, then checks that every position each sequence attends to holds what it should (same
position, same token, same prefix). Wrong prefix hits, blocks reused while held, or hashes
for KV that was never written all fail there.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from vserve.config import CacheConfig, SchedulerConfig
from vserve.core.request import Request, RequestStatus
from vserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from vserve.core.scheduler import Scheduler
from vserve.protocol.outputs import EngineCoreOutput, FinishReason, Logprobs
from vserve.protocol.sampling import SamplingParams


def default_token(rid: str, pos: int) -> int:
    return 100 + zlib.crc32(f"{rid}/{pos}".encode()) % 50


class FakeRunner:
    def __init__(self, block_size: int, token_fn: Callable[[Request], int] | None = None) -> None:
        self.bs = block_size
        self.token_fn = token_fn or (lambda r: default_token(r.request_id, r.num_tokens))
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, prefix fingerprint)
        self._fp: dict[str, list[int]] = {}

    def _fingerprints(self, r: Request) -> list[int]:
        fps = self._fp.setdefault(r.request_id, [])
        for p in range(len(fps), r.num_tokens):
            fps.append(hash((fps[-1] if fps else 0, r.all_token_ids[p])))
        return fps

    def __call__(self, out: SchedulerOutput) -> ModelRunnerOutput:
        res = ModelRunnerOutput()
        for s in out.scheduled:
            r, c, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            assert n > 0 and 0 not in s.block_ids
            assert len(s.block_ids) * self.bs >= c + n
            fps = self._fingerprints(r)
            for p in range(c, c + n):
                self.slots[s.block_ids[p // self.bs] * self.bs + p % self.bs] = (p, fps[p])
        for s in out.scheduled:  # read after all writes, as the attention backend does
            r, c, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            fps = self._fingerprints(r)
            for p in range(c + n):
                slot = s.block_ids[p // self.bs] * self.bs + p % self.bs
                assert self.slots.get(slot) == (p, fps[p]), f"{r.request_id} reads bad KV at {p}"
            if s.samples:
                res.sampled_token_ids[r.request_id] = self.token_fn(r)
            if r.sampling_params.prompt_logprobs is not None:
                # Logprob of prompt token p comes from the logits at p - 1.
                lo = max(c + 1, r.num_prompt_logprobs_done, 1)
                hi = min(c + n + 1, r.num_prompt_tokens)
                rows = range(lo, hi)
                r.num_prompt_logprobs_done = max(r.num_prompt_logprobs_done, hi)
                res.prompt_logprobs[r.request_id] = Logprobs(
                    [[r.all_token_ids[p]] for p in rows],
                    [[-float(p)] for p in rows],
                    [1] * len(rows),
                )
        return res


def make_scheduler(
    *,
    budget: int = 64,
    max_seqs: int = 16,
    block_size: int = 4,
    num_blocks: int = 64,
    max_model_len: int = 64,
    prefix: bool = True,
    chunked: bool = True,
    policy: str = "fcfs",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            enable_chunked_prefill=chunked,
            scheduling_policy=policy,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        num_blocks,
        max_model_len,
    )


def make_request(
    rid: str,
    prompt: list[int] | int,
    *,
    eos: tuple[int, ...] = (0,),
    client: int = 0,
    priority: int = 0,
    arrival: float = 0.0,
    **params: Any,
) -> Request:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    params.setdefault("max_tokens", 8)
    sp = SamplingParams(**params)
    return Request(rid, tokens, sp, list(eos), arrival, client, priority)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    outputs = sched.update_from_output(out, runner(out))
    return out, [o for outs in outputs.values() for o in outs.unpack()]


def run_all(
    sched: Scheduler, runner: FakeRunner, max_steps: int = 2000
) -> tuple[dict[str, list[EngineCoreOutput]], list[str]]:
    """Steps until nothing is left; returns outputs per request and the finish order."""
    per_req: dict[str, list[EngineCoreOutput]] = {}
    finished: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return per_req, finished
        _, outs = step(sched, runner)
        for o in outs:
            assert o.request_id not in finished, "output after finish"
            per_req.setdefault(o.request_id, []).append(o)
            if o.finished:
                finished.append(o.request_id)
    raise AssertionError("did not finish")


def tokens_of(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


# ---- budget, chunking, ordering -------------------------------------------------------


def test_token_budget_and_sequence_cap() -> None:
    sched = make_scheduler(budget=20, max_seqs=3)
    runner = FakeRunner(4)
    for i in range(8):
        sched.add_request(make_request(f"r{i}", [i + 1] * (5 + i), max_tokens=4))
    seen_full_budget = False
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out, _ = step(sched, runner)
        assert out.total_num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.total_num_scheduled_tokens <= 20
        assert len(out.scheduled) <= 3 and sched.num_running <= 3
        seen_full_budget |= out.total_num_scheduled_tokens == 20
    assert not sched.has_unfinished_requests()
    assert seen_full_budget  # the budget is used, not just respected


def test_chunked_prefill_continues_across_steps() -> None:
    sched = make_scheduler(budget=32, max_model_len=128, num_blocks=40)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 70, max_tokens=3))
    chunks, samples = [], []
    while sched.has_unfinished_requests():
        out, outs = step(sched, runner)
        chunks.append(out.scheduled[0].num_new_tokens)
        samples.append(bool(outs))
    assert chunks == [32, 32, 6, 1, 1]
    assert samples == [False, False, True, True, True]


def test_without_chunking_a_prompt_that_does_not_fit_waits() -> None:
    sched = make_scheduler(budget=64, chunked=False)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", [1] * 40))
    sched.add_request(make_request("b", [2] * 30))
    sched.add_request(make_request("c", [3] * 10))
    out, _ = step(sched, runner)
    # b would fit only as a chunk; FCFS also keeps c behind it.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 40)]
    out, _ = step(sched, runner)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 1),
        ("b", 30),
        ("c", 10),
    ]


def test_running_requests_are_served_before_waiting_ones() -> None:
    sched = make_scheduler(budget=10)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 3))
    step(sched, runner)
    sched.add_request(make_request("c", 30))
    out, _ = step(sched, runner)
    got = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    assert got == [("a", 1), ("b", 1), ("c", 8)]


def test_requests_past_max_model_len_are_rejected() -> None:
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", 17))
    with pytest.raises(ValueError):
        sched.add_request(make_request("b", []))
    sched.add_request(make_request("c", 16))
    with pytest.raises(ValueError):
        sched.add_request(make_request("c", 3))


def test_config_that_could_never_run_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity"):
        make_scheduler(num_blocks=4, max_model_len=64)  # 3 blocks of 4 tokens
    with pytest.raises(ValueError, match="chunked"):
        make_scheduler(budget=32, chunked=False)


# ---- preemption and priority ----------------------------------------------------------


@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_recomputes_and_keeps_fcfs_order(prefix: bool) -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[EngineCoreOutput]], list[str], Scheduler]:
        sched = make_scheduler(num_blocks=num_blocks, max_model_len=32, prefix=prefix)
        for rid in "abc":
            sched.add_request(make_request(rid, [ord(rid)] * 8, max_tokens=12))
        per_req, order = run_all(sched, FakeRunner(4))
        return per_req, order, sched

    ref, ref_order, _ = run(64)
    per_req, order, sched = run(9)  # 8 usable blocks; the three need 5 each at the end
    assert sched.get_stats().num_preemptions > 0
    assert order == ref_order == ["a", "b", "c"]
    for rid in "abc":
        assert tokens_of(per_req[rid]) == tokens_of(ref[rid])  # no duplicates, nothing lost
        assert len(tokens_of(per_req[rid])) == 12
    assert sched.kv_cache_manager.num_free_blocks == 8


def test_fcfs_preempts_the_latest_arrival_and_requeues_it_first() -> None:
    sched = make_scheduler(num_blocks=7, max_model_len=24, prefix=False)
    runner = FakeRunner(4)
    for rid in "abc":
        sched.add_request(make_request(rid, 8, max_tokens=10))
    out, _ = step(sched, runner)  # 2 blocks each: all 6 used, all sampled
    assert sched.kv_cache_manager.num_free_blocks == 0
    sched.add_request(make_request("d", 4))
    out, _ = step(sched, runner)  # a needs a 3rd block: c goes, then b needs one too
    assert out.preempted_request_ids == ["c"]
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    c = sched.requests["c"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and c.num_output_tokens == 1
    assert sched.get_stats().num_preemptions == 1
    assert sched.get_stats().num_preemptions == 1  # cumulative: reading does not reset


def _priority_scenario(policy: str) -> tuple[Scheduler, SchedulerOutput]:
    sched = make_scheduler(num_blocks=6, max_model_len=20, policy=policy)  # 5 usable blocks
    runner = FakeRunner(4)
    sched.add_request(make_request("lo", [1, 2], priority=1, arrival=0.0))
    step(sched, runner)  # lo: 1 block
    sched.add_request(make_request("hi", [3] * 12, priority=0, arrival=1.0))
    sched.add_request(make_request("x", [4, 5], priority=0, arrival=2.0))
    step(sched, runner)  # hi: 3 blocks, x: 1 block; the cache is full
    # A tight budget for the next step, so that a refund is visible.
    sched.config = dataclasses.replace(sched.config, max_num_batched_tokens=2)
    out, _ = step(sched, runner)  # lo fits its block; hi needs a 4th
    return sched, out


def test_priority_preempts_the_lowest_priority_even_if_already_scheduled() -> None:
    sched, out = _priority_scenario("priority")
    assert out.preempted_request_ids == ["lo"]
    # lo's token is refunded, so x still fits the budget of 2.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("hi", 1),
        ("x", 1),
    ]
    assert sched.requests["lo"].status == RequestStatus.PREEMPTED
    # The same situation under FCFS preempts x, the latest arrival.
    sched, out = _priority_scenario("fcfs")
    assert out.preempted_request_ids == ["x"]
    assert [s.request.request_id for s in out.scheduled] == ["lo", "hi"]


def test_priority_policy_orders_waiting_requests() -> None:
    sched = make_scheduler(max_seqs=1, policy="priority")
    sched.add_request(make_request("late-lo", 4, priority=5, arrival=0.0, max_tokens=2))
    sched.add_request(make_request("hi", 4, priority=0, arrival=2.0, max_tokens=2))
    sched.add_request(make_request("early-mid", 4, priority=1, arrival=1.0, max_tokens=2))
    sched.add_request(make_request("late-mid", 4, priority=1, arrival=3.0, max_tokens=2))
    _, order = run_all(sched, FakeRunner(4))
    assert order == ["hi", "early-mid", "late-mid", "late-lo"]


# ---- prefix caching through the scheduler ---------------------------------------------


def test_identical_requests_share_prompt_blocks_in_one_step() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    prompt = list(range(1, 15))
    sched.add_request(make_request("s0", prompt))
    sched.add_request(make_request("s1", prompt))
    out, outs = step(sched, runner)
    kv = sched.kv_cache_manager
    assert kv.get_block_ids("s0")[:3] == kv.get_block_ids("s1")[:3]
    assert [s.num_new_tokens for s in out.scheduled] == [14, 2]
    assert {r: sched.requests[r].num_cached_tokens for r in ("s0", "s1")} == {"s0": 0, "s1": 12}
    stats = sched.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (28, 12)
    assert stats.num_scheduled_tokens == 16
    assert stats.num_running_reqs == 2 and stats.num_waiting_reqs == 0
    assert stats.kv_cache_usage == pytest.approx(5 / 63)
    # The front end learns the hits with each request's finish.
    per_req, _ = run_all(sched, runner)
    assert {r: o[-1].num_cached_tokens for r, o in per_req.items()} == {"s0": 0, "s1": 12}


def test_later_request_hits_a_finished_requests_prefix() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 10, max_tokens=2))
    run_all(sched, runner)
    sched.add_request(make_request("b", 13, max_tokens=1))
    out, outs = step(sched, runner)
    assert out.scheduled[0].num_new_tokens == 5  # 8 cached, 5 computed
    assert outs[0].num_cached_tokens == 8 and outs[0].finished


def test_num_cached_tokens_is_fixed_at_first_schedule() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 10, max_tokens=5))
    step(sched, runner)
    step(sched, runner)
    sched._preempt(sched.requests["a"])  # as memory pressure would
    out, outs = step(sched, runner)
    # The recompute hits a's own blocks (11 of its 12 tokens computed: 2 full blocks)...
    assert out.scheduled[0].num_new_tokens == 12 - 8
    # ...but the client-visible cache hit stays what the first schedule found.
    assert outs[0].num_cached_tokens == 0 and sched.requests["a"].num_cached_tokens == 0


# ---- aborts ---------------------------------------------------------------------------


def test_abort_frees_blocks_and_is_announced() -> None:
    sched = make_scheduler(budget=16, max_seqs=2)
    runner = FakeRunner(4)
    initial = sched.kv_cache_manager.num_free_blocks
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 10, max_tokens=20))
    step(sched, runner)
    step(sched, runner)
    assert sched.num_running == 2 and sched.num_waiting == 2
    aborted = sched.abort_requests(["r0", "r3", "nope", "r0"])
    assert [r.request_id for r in aborted] == ["r0", "r3"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert sched.num_running == 1 and sched.num_waiting == 1
    out, _ = step(sched, runner)
    assert out.finished_request_ids == {"r0", "r3"}
    assert "r0" not in {s.request.request_id for s in out.scheduled}
    out, _ = step(sched, runner)
    assert out.finished_request_ids == set()
    sched.abort_requests(["r1", "r2"])
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.num_free_blocks == initial


def test_finished_ids_wait_for_a_step_the_runner_sees() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 4))
    step(sched, runner)
    sched.abort_requests(["a"])
    # An empty step may never reach the runner, so it does not consume the ids.
    assert sched.schedule().finished_request_ids == {"a"}
    assert sched.schedule().finished_request_ids == {"a"}
    sched.add_request(make_request("b", 4))
    assert step(sched, runner)[0].finished_request_ids == {"a"}
    assert step(sched, runner)[0].finished_request_ids == set()


def test_abort_between_schedule_and_update_emits_nothing_for_it() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 4))
    sched.add_request(make_request("b", 4))
    out = sched.schedule()
    res = runner(out)
    sched.abort_requests(["a"])
    outs = sched.update_from_output(out, res)
    assert [o.request_id for o in outs[0].unpack()] == ["b"]


# ---- stop conditions and outputs ------------------------------------------------------


def scripted(tokens: list[int]) -> Callable[[Request], int]:
    return lambda r: tokens[r.num_output_tokens]


@pytest.mark.parametrize(
    ("script", "params", "expect_tokens", "reason", "stop_reason"),
    [
        ([5, 2, 7], {}, [5, 2], FinishReason.STOP, None),
        (
            [5, 2, 7, 8],
            {"ignore_eos": True, "max_tokens": 4},
            [5, 2, 7, 8],
            FinishReason.LENGTH,
            None,
        ),
        ([2, 2, 2, 9], {"min_tokens": 3}, [2, 2, 2], FinishReason.STOP, None),
        ([5, 7, 9], {"stop_token_ids": [7]}, [5, 7], FinishReason.STOP, 7),
        ([7, 7, 9], {"stop_token_ids": [7], "min_tokens": 2}, [7, 7], FinishReason.STOP, 7),
        ([2], {"stop_token_ids": [2]}, [2], FinishReason.STOP, 2),  # stop token before EOS
        ([5, 6, 7, 8], {"max_tokens": 3}, [5, 6, 7], FinishReason.LENGTH, None),
        ([5, 2], {"max_tokens": 2}, [5, 2], FinishReason.STOP, None),  # EOS before length
        (
            [5, 6, 7, 8, 9, 1, 3],
            {"max_tokens": None},
            [5, 6, 7, 8, 9, 1],
            FinishReason.LENGTH,
            None,
        ),
    ],
)
def test_stop_conditions(
    script: list[int],
    params: dict[str, Any],
    expect_tokens: list[int],
    reason: FinishReason,
    stop_reason: int | None,
) -> None:
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_request("a", 10, eos=(2,), **params))
    per_req, _ = run_all(sched, FakeRunner(4, scripted(script)))
    outs = per_req["a"]
    assert tokens_of(outs) == expect_tokens
    assert all(len(o.new_token_ids) == 1 for o in outs)
    assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + [reason]
    assert outs[-1].stop_reason == stop_reason
    assert sched.kv_cache_manager.num_free_blocks == 63


def test_prompt_of_max_model_len_gets_one_token() -> None:
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_request("a", 16, max_tokens=None))
    per_req, _ = run_all(sched, FakeRunner(4))
    assert len(tokens_of(per_req["a"])) == 1
    assert per_req["a"][-1].finish_reason == FinishReason.LENGTH


def test_outputs_are_routed_by_client_index() -> None:
    sched = make_scheduler()
    runner = FakeRunner(4)
    for i, client in enumerate([0, 2, 2, 5]):
        sched.add_request(make_request(f"r{i}", 4, client=client))
    out = sched.schedule()
    outputs = sched.update_from_output(out, runner(out))
    assert {k: [o.request_id for o in v.unpack()] for k, v in outputs.items()} == {
        0: ["r0"],
        2: ["r1", "r2"],
        5: ["r3"],
    }
    assert sched.request_ids_of_client(2) == ["r1", "r2"]
    assert sched.request_ids_of_client(7) == []


def test_prompt_logprobs_arrive_once_across_chunks_and_preemption() -> None:
    sched = make_scheduler(budget=4)
    runner = FakeRunner(4)
    sched.add_request(make_request("a", 10, prompt_logprobs=1, max_tokens=2))
    outs: list[EngineCoreOutput] = []
    for _ in range(2):
        outs += step(sched, runner)[1]
    # Preempt mid-prefill by hand (as memory pressure would) and let it recompute.
    req = sched.requests["a"]
    sched._preempt(req)
    for _ in range(10):
        outs += step(sched, runner)[1]
    rows = [tok for o in outs if o.new_prompt_logprobs for tok in o.new_prompt_logprobs.token_ids]
    assert rows == [[p] for p in range(2, 11)]  # prompt positions 1..9, each once
    mid = [o for o in outs if not o.new_token_ids]
    assert len(mid) == 2 and all(o.new_prompt_logprobs for o in mid)
    assert len(tokens_of(outs)) == 2 and outs[-1].finished


# ---- randomized -----------------------------------------------------------------------


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    pool = kv.block_pool
    holders: Counter[int] = Counter()
    position: dict[int, int] = {}
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        blocks = kv.get_blocks(r.request_id)
        assert [b.block_id for b in blocks] == kv.get_block_ids(r.request_id)
        assert len(blocks) * kv.block_size >= r.num_computed_tokens
        for i, b in enumerate(blocks):
            holders[b.block_id] += 1
            # A shared block holds the same prefix for everyone: same index in each table.
            assert position.setdefault(b.block_id, i) == i
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert kv.get_blocks(r.request_id) == [] and r.num_computed_tokens == 0
    ids = [r.request_id for r in sched.running] + [r.request_id for r in sched.waiting]
    assert sorted(ids) == sorted(sched.requests)
    for b in pool.blocks[1:]:
        assert b.ref_cnt == holders[b.block_id]
        if holders[b.block_id] > 1:
            assert b.block_hash is not None
    assert 0 not in holders
    assert pool.num_free_blocks + len(holders) == pool.num_blocks - 1
    assert sched.num_running <= sched.config.max_num_seqs


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_randomized_run_keeps_invariants(seed: int, policy: str) -> None:
    rng = random.Random(seed)
    bs, max_len = 4, 48
    sched = make_scheduler(
        budget=rng.choice([8, 16, 32]),
        max_seqs=4,
        block_size=bs,
        num_blocks=13,
        max_model_len=max_len,
        prefix=seed != 3,
        policy=policy,
    )
    runner = FakeRunner(bs)
    prefixes = [[rng.randrange(1, 90) for _ in range(20)] for _ in range(3)]
    pending: list[Request] = []
    for i in range(40):
        prompt = rng.choice(prefixes)[: rng.randint(0, 20)]
        prompt += [rng.randrange(1, 90) for _ in range(rng.randint(1, 12))]
        params: dict[str, Any] = {
            "max_tokens": rng.choice([1, 5, 20, None]),
            "ignore_eos": rng.random() < 0.5,
        }
        req = make_request(
            f"r{i}", prompt, eos=(100,), priority=rng.randint(0, 3), arrival=float(i), **params
        )
        pending.append(req)
        if rng.random() < 0.3:  # like n > 1: the same prompt right behind
            pending.append(make_request(f"r{i}.1", prompt, eos=(100,), arrival=float(i)))
    all_reqs = {r.request_id: r for r in pending}
    emitted: dict[str, list[int]] = {rid: [] for rid in all_reqs}
    finished: set[str] = set()
    aborted: set[str] = set()
    for _ in range(3000):
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished_requests():
            break
        if sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(sched.requests))
            assert [r.request_id for r in sched.abort_requests([rid])] == [rid]
            aborted.add(rid)
        out, outs = step(sched, runner)
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(out.scheduled) <= 4
        sched_ids = [s.request.request_id for s in out.scheduled]
        assert len(set(sched_ids)) == len(sched_ids)
        assert not set(sched_ids) & set(out.preempted_request_ids)
        for s in out.scheduled:
            assert s.request.num_computed_tokens <= max_len
        for o in outs:
            assert o.request_id not in finished
            emitted[o.request_id] += o.new_token_ids
            if o.finished:
                finished.add(o.request_id)
        check_invariants(sched)
    else:
        raise AssertionError("did not finish")
    assert finished | aborted == set(all_reqs) and not finished & aborted
    for rid, req in all_reqs.items():
        assert req.is_finished
        assert emitted[rid] == req.output_token_ids  # each token exactly once
        assert req.num_tokens <= max_len + 1
    assert sched.kv_cache_manager.num_free_blocks == 12
    assert sched.kv_cache_manager.usage == 0.0
