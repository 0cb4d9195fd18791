"""KVCacheManager: prefix hits, same-step sharing, recompute rule, eviction, atomic failure."""

from __future__ import annotations

from typing import Any

import pytest

from vserve.core.block_pool import KVCacheBlock
from vserve.core.kv_cache_manager import KVCacheManager
from vserve.core.request import Request
from vserve.protocol.sampling import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], **params: Any) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=16, **params), eos_token_ids=[0])


def admit(mgr: KVCacheManager, req: Request, num_new: int | None = None) -> list[KVCacheBlock]:
    """What the scheduler does for a waiting request; returns the hit blocks."""
    hits, num_hit = mgr.get_computed_blocks(req)
    n = req.num_tokens - num_hit if num_new is None else num_new
    assert mgr.allocate_slots(req, n, hits, num_hit) is not None
    req.num_computed_tokens = num_hit
    return hits


def run_step(req: Request, num_new: int) -> None:
    req.num_computed_tokens += num_new


def snapshot(mgr: KVCacheManager) -> object:
    pool = mgr.block_pool
    return (
        pool.free_block_ids(),
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        dict(pool._cached),
        {rid: list(ids) for rid, ids in mgr._req_block_ids.items()},
        dict(mgr._num_cached_blocks),
    )


PROMPT = list(range(1, 15))  # 14 tokens: 3 full blocks + 2


def test_same_prompt_hits_and_shares_blocks() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a = make_request("a", PROMPT)
    assert admit(mgr, a) == []
    run_step(a, a.num_tokens)
    b = make_request("b", PROMPT)
    hits = admit(mgr, b)
    assert len(hits) == 3 and b.num_computed_tokens == 12
    a_blocks, b_blocks = mgr.get_blocks("a"), mgr.get_blocks("b")
    assert b_blocks[:3] == a_blocks[:3]
    assert all(blk.ref_cnt == 2 for blk in a_blocks[:3])
    assert b_blocks[3] is not a_blocks[3] and b_blocks[3].ref_cnt == 1
    assert mgr.make_prefix_cache_stats() == (28, 12)
    assert mgr.make_prefix_cache_stats() == (0, 0)  # reset by the call


def test_diverging_prompts_hit_the_common_prefix_only() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a = make_request("a", PROMPT)
    admit(mgr, a)
    run_step(a, a.num_tokens)
    # Same first 5 tokens, then different: only the first block matches.
    b = make_request("b", PROMPT[:5] + [99] * 9)
    hits = admit(mgr, b)
    assert [blk.block_id for blk in hits] == mgr.get_block_ids("a")[:1]
    # A later block that matches token-wise but follows a different prefix never hits.
    c = make_request("c", [77] * 4 + PROMPT[4:])
    assert mgr.get_computed_blocks(c) == ([], 0)


def test_identical_requests_share_blocks_in_the_same_step() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a, b = make_request("a", PROMPT), make_request("b", PROMPT)
    admit(mgr, a)  # not computed yet: its blocks are cached at allocation
    hits = admit(mgr, b)
    assert len(hits) == 3
    assert mgr.get_block_ids("b")[:3] == mgr.get_block_ids("a")[:3]
    # 4 blocks for a, 1 extra for b.
    assert mgr.num_free_blocks == 19 - 5


def test_chunked_prefill_caches_only_blocks_filled_so_far() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a = make_request("a", PROMPT)
    admit(mgr, a, num_new=6)  # one full block + 2 tokens of the next
    b = make_request("b", PROMPT)
    assert len(mgr.get_computed_blocks(b)[0]) == 1
    run_step(a, 6)
    assert mgr.allocate_slots(a, 6) is not None  # now 12 tokens: 3 full blocks
    assert len(mgr.get_computed_blocks(b)[0]) == 3


@pytest.mark.parametrize(
    ("num_tokens", "expect_blocks"), [(16, 3), (17, 4), (15, 3), (4, 0), (5, 1)]
)
def test_last_token_is_always_recomputed(num_tokens: int, expect_blocks: int) -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    prompt = list(range(1, 18))
    a = make_request("a", prompt)
    admit(mgr, a)
    run_step(a, a.num_tokens)
    b = make_request("b", prompt[:num_tokens])
    hits, num_hit = mgr.get_computed_blocks(b)
    assert len(hits) == expect_blocks and num_hit == expect_blocks * BS
    assert num_hit < b.num_tokens


def test_no_lookup_when_caching_is_off_or_prompt_logprobs_are_asked() -> None:
    off = KVCacheManager(20, BS, False, 64)
    a = make_request("a", PROMPT)
    admit(off, a)
    run_step(a, a.num_tokens)
    assert off.get_computed_blocks(make_request("b", PROMPT)) == ([], 0)
    assert all(blk.block_hash is None for blk in off.get_blocks("a"))
    assert off.make_prefix_cache_stats() == (0, 0)

    on = KVCacheManager(20, BS, True, 64)
    a = make_request("a", PROMPT)
    admit(on, a)
    run_step(a, a.num_tokens)
    lp = make_request("lp", PROMPT, prompt_logprobs=1)
    assert on.get_computed_blocks(lp) == ([], 0)
    assert len(on.get_computed_blocks(make_request("b", PROMPT))[0]) == 3


def test_free_cached_blocks_are_evicted_only_when_plain_free_blocks_run_out() -> None:
    mgr = KVCacheManager(9, BS, True, 64)  # 8 usable blocks
    a = make_request("a", list(range(1, 17)) + [50])  # 4 full blocks + 1 token: 5 blocks
    admit(mgr, a)
    run_step(a, a.num_tokens)
    a_ids = list(mgr.get_block_ids("a"))
    mgr.free(a)
    assert mgr.num_free_blocks == 8
    probe = make_request("probe", a.all_token_ids)

    def a_prefix_hits() -> list[int]:
        return [blk.block_id for blk in mgr.get_computed_blocks(probe)[0]]

    # 3 never-used free blocks remain: using them keeps a's prefix intact.
    admit(mgr, make_request("b", [200 + i for i in range(12)]))
    assert not set(mgr.get_block_ids("b")) & set(a_ids)
    assert a_prefix_hits() == a_ids[:4]
    # Next comes a's partial tail block (freed first, holds no hash): still nothing lost.
    admit(mgr, make_request("c", [300, 301, 302]))
    assert mgr.get_block_ids("c") == [a_ids[4]]
    assert a_prefix_hits() == a_ids[:4]
    # Then a's last full block: the prefix shrinks from its end, never from its start.
    admit(mgr, make_request("d", [400, 401, 402, 403]))
    assert mgr.get_block_ids("d") == [a_ids[3]]
    assert a_prefix_hits() == a_ids[:3]


def test_allocation_failure_leaves_state_untouched() -> None:
    mgr = KVCacheManager(7, BS, True, 64)  # 6 usable blocks
    a = make_request("a", PROMPT)  # 4 blocks
    admit(mgr, a)
    run_step(a, a.num_tokens)
    mgr.free(a)  # 3 cached-but-free blocks + 3 plain
    blocker = make_request("blocker", [500] * 8)
    admit(mgr, blocker)  # takes the 2 never-used blocks: left are a's tail + 3 cached blocks
    # b needs 5 blocks: 3 free cached hits + 2 new, one more than the 4 free ones.
    b = make_request("b", PROMPT[:12] + [600] * 5)
    hits, num_hit = mgr.get_computed_blocks(b)
    assert len(hits) == 3 and all(blk.ref_cnt == 0 for blk in hits)
    before = snapshot(mgr)
    assert mgr.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit) is None
    assert snapshot(mgr) == before
    assert mgr.get_blocks("b") == []
    assert mgr.make_prefix_cache_stats() == (14 + 8, 0)  # a and blocker only
    # Exactly enough (3 hits + 1 new = the 4 free blocks): succeeds.
    c = make_request("c", PROMPT[:12] + [600] * 3)
    hits, num_hit = mgr.get_computed_blocks(c)
    assert mgr.allocate_slots(c, c.num_tokens - num_hit, hits, num_hit) is not None
    assert mgr.num_free_blocks == 0


def test_growing_a_running_request_and_stable_block_id_list() -> None:
    mgr = KVCacheManager(10, BS, True, 64)
    a = make_request("a", [1, 2, 3])
    admit(mgr, a)
    ids = mgr.get_block_ids("a")
    assert len(ids) == 1
    run_step(a, 3)
    for tok in range(10, 16):  # decode 6 tokens
        a.append_output_token(tok)
        assert mgr.allocate_slots(a, 1) is not None
        # A block is findable from the step that fills it.
        probe = make_request("probe", a.all_token_ids + [9])
        assert len(mgr.get_computed_blocks(probe)[0]) == len(a.all_token_ids) // BS
        run_step(a, 1)
    assert mgr.get_block_ids("a") is ids
    assert len(ids) == 3  # 9 computed tokens
    assert mgr.allocate_slots(a, 0) == []  # nothing new needed
    # Decode-filled blocks are cached too: the full sequence is findable.
    assert len(mgr.get_computed_blocks(make_request("b", a.all_token_ids + [9]))[0]) == 2
    with pytest.raises(ValueError):
        mgr.allocate_slots(a, 2)  # only one uncomputed token exists
    mgr.free(a)
    assert mgr.num_free_blocks == 9 and mgr.usage == 0.0
    with pytest.raises(KeyError):
        mgr.get_block_ids("a")


def test_free_drops_hashes_of_blocks_never_computed() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a = make_request("a", PROMPT)
    admit(mgr, a, num_new=10)  # blocks 0,1 full and cached at allocation
    run_step(a, 6)  # pretend only 6 tokens were computed when it was freed (preempted)
    mgr.free(a)
    hits = mgr.get_computed_blocks(make_request("b", PROMPT))[0]
    assert len(hits) == 1  # block 1 (tokens 4..7) was never fully written


def test_free_keeps_hashes_of_uncomputed_blocks_others_hold() -> None:
    mgr = KVCacheManager(20, BS, True, 64)
    a, b = make_request("a", PROMPT), make_request("b", PROMPT)
    admit(mgr, a)
    admit(mgr, b)  # shares a's 3 blocks in the same step
    mgr.free(a)  # b still holds them and the step writes them
    assert len(mgr.get_computed_blocks(make_request("c", PROMPT))[0]) == 3


def test_usage() -> None:
    mgr = KVCacheManager(11, BS, True, 64)
    a = make_request("a", PROMPT)
    admit(mgr, a)
    assert mgr.usage == pytest.approx(0.4)
    run_step(a, a.num_tokens)
    mgr.free(a)
    assert mgr.usage == 0.0
