"""BlockPool: null block, LRU free queue, prefix index and hash eviction on reuse."""

from __future__ import annotations

import random

import pytest

from vserve.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens


def check_invariants(pool: BlockPool) -> None:
    free_ids = pool.free_block_ids()
    assert len(free_ids) == pool.num_free_blocks
    assert len(set(free_ids)) == len(free_ids)
    assert 0 not in free_ids
    assert pool.null_block.ref_cnt == 0 and pool.null_block.block_hash is None
    for block in pool.blocks[1:]:
        assert block.ref_cnt >= 0
        assert (block.ref_cnt == 0) == (block.block_id in free_ids), block
        if block.block_hash is not None:
            assert pool.get_cached_block(block.block_hash) is block
    cached = [b for b in pool.blocks if b.block_hash is not None]
    assert len(cached) == pool.num_cached_blocks
    in_use = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    assert in_use + pool.num_free_blocks == pool.num_blocks - 1
    assert pool.usage == pytest.approx(in_use / (pool.num_blocks - 1))


def test_hash_is_deterministic_chained_and_64_bit() -> None:
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert h == hash_block_tokens(None, (1, 2, 3, 4))
    assert 0 <= h < 2**64
    assert h != hash_block_tokens(None, [1, 2, 4, 3])
    assert h != hash_block_tokens(None, [1, 2, 3])
    # The parent is part of the hash: same tokens after a different prefix differ.
    assert hash_block_tokens(h, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(h, [5, 6]) != hash_block_tokens(h + 1, [5, 6])
    # No ambiguity between "no parent" and a parent of 0, nor with token bytes.
    assert hash_block_tokens(0, [7]) != hash_block_tokens(None, [7])
    assert hash_block_tokens(None, [0, 7]) != hash_block_tokens(0, [7])


def test_null_block_is_never_allocated() -> None:
    pool = BlockPool(5)
    assert pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError):
        pool.touch([pool.null_block])
    with pytest.raises(ValueError):
        pool.free_blocks([pool.null_block])
    check_invariants(pool)


def test_failed_allocation_changes_nothing() -> None:
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.cache_full_block(b, 123)
    pool.free_blocks([b])
    before = pool.free_block_ids()
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.free_block_ids() == before
    assert pool.get_cached_block(123) is b


def test_lru_order_freed_blocks_go_to_tail() -> None:
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    ids = [b.block_id for b in blocks]
    assert ids == [1, 2, 3, 4, 5]  # fresh pool hands out in id order
    by_id = {b.block_id: b for b in blocks}
    pool.free_blocks([by_id[3], by_id[1], by_id[5]])
    assert pool.free_block_ids() == [3, 1, 5]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 1]
    pool.free_blocks([by_id[2]])
    assert pool.free_block_ids() == [5, 2]
    check_invariants(pool)


def test_shared_block_is_freed_only_at_zero_refs() -> None:
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and b.block_id not in pool.free_block_ids()
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and pool.free_block_ids()[-1] == b.block_id
    with pytest.raises(ValueError):
        pool.free_blocks([b])
    check_invariants(pool)


def test_free_cached_block_stays_findable_until_reused() -> None:
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    assert pool.cache_full_block(a, 111)
    assert pool.cache_full_block(b, 222)
    pool.free_blocks([a, b, c])  # free order a, b, c: a is evicted first
    assert pool.num_free_blocks == 3
    assert pool.get_cached_block(111) is a and pool.get_cached_block(222) is b
    (first,) = pool.get_new_blocks(1)
    assert first is a
    assert a.block_hash is None and pool.get_cached_block(111) is None  # evicted on reuse
    assert pool.get_cached_block(222) is b
    check_invariants(pool)


def test_touch_takes_a_free_cached_block_out_of_the_queue() -> None:
    pool = BlockPool(5)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_full_block(b, 7)
    pool.free_blocks([a, b, c])
    assert pool.free_block_ids() == [4, 1, 2, 3]
    hit = pool.get_cached_block(7)
    assert hit is b
    pool.touch([hit])
    assert b.ref_cnt == 1 and pool.free_block_ids() == [4, 1, 3]
    # Exhausting the free queue never hands out (or un-hashes) the touched block.
    rest = pool.get_new_blocks(3)
    assert b not in rest and pool.get_cached_block(7) is b
    check_invariants(pool)
    pool.free_blocks([b])
    assert pool.free_block_ids() == [2]


def test_duplicate_hash_keeps_the_first_block() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, 5)
    assert not pool.cache_full_block(b, 5)
    assert b.block_hash is None and pool.get_cached_block(5) is a
    assert pool.cache_full_block(a, 5)  # idempotent for the same hash


def test_caching_disabled_indexes_nothing() -> None:
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_full_block(a, 5)
    assert pool.get_cached_block(5) is None



def test_randomized_against_a_reference_model() -> None:
    rng = random.Random(1234)
    pool = BlockPool(12)
    ref_free = list(range(1, 12))  # reference LRU order, head first
    ref_refs = [0] * 12
    ref_hash: dict[int, int] = {}  # block id -> hash
    held: list[KVCacheBlock] = []
    next_hash = 1000
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 and ref_free:
            n = rng.randint(1, len(ref_free))
            got = pool.get_new_blocks(n)
            expect, ref_free = ref_free[:n], ref_free[n:]
            assert [b.block_id for b in got] == expect
            for b in got:
                ref_refs[b.block_id] = 1
                ref_hash.pop(b.block_id, None)
            held.extend(got)
        elif op < 0.6 and held:
            b = held.pop(rng.randrange(len(held)))
            pool.free_blocks([b])
            ref_refs[b.block_id] -= 1
            if ref_refs[b.block_id] == 0:
                ref_free.append(b.block_id)
        elif op < 0.75 and held:
            b = rng.choice(held)
            if b.block_id not in ref_hash:
                next_hash += 1
                assert pool.cache_full_block(b, next_hash)
                ref_hash[b.block_id] = next_hash
        elif ref_hash:
            bid, h = rng.choice(sorted(ref_hash.items()))
            hit = pool.get_cached_block(h)
            assert hit is not None and hit.block_id == bid
            pool.touch([hit])
            if ref_refs[bid] == 0:
                ref_free.remove(bid)
            ref_refs[bid] += 1
            held.append(hit)
        assert pool.free_block_ids() == ref_free
        assert {b.block_id: b.block_hash for b in pool.blocks if b.block_hash} == ref_hash
        assert [b.ref_cnt for b in pool.blocks] == ref_refs
    check_invariants(pool)
