"""Physical KV-cache blocks: allocation, reference counts, LRU eviction and the prefix index.

Invariants (checked by the tests after every operation):

* Block 0 is the *null block*: never handed out, never freed, never cached. Padded block-table
  entries point at it, so whatever is written there is garbage by design.
* Every other block is either *in use* (``ref_cnt > 0``, owned by one or more requests) or
  *free* (``ref_cnt == 0``, in the free queue). There is no third state.
* A free block may still hold a ``block_hash``: it stays findable through the prefix index
  until ``get_new_blocks`` reuses it, which evicts the hash first. Free blocks are reused in
  LRU order: freed blocks go to the tail of the queue, allocation takes from the head.
* The prefix index maps each hash to exactly one block, and that block's ``block_hash`` is
  that hash; a block's hash is only cleared by eviction.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

# Hashes are salted per process: with only 64 bits an offline birthday search for two
# colliding blocks costs ~2**32 sha256 calls, which is cheap; without the salt a client could
# precompute a colliding pair, plant one half, and wait for a victim prompt carrying the other
# half to read the planted KV. The prefix cache lives in one process, so nothing else needs
# the same hash values.
_HASH_SALT = os.urandom(16)
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: sha256 of (salt, parent hash, tokens) cut to 64 bits.

    The encoding is injective (a marker byte says whether a parent follows; the parent and
    every token take exactly 8 bytes), so distinct inputs only collide through sha256 itself.
    The chain makes a block's hash identify the whole prefix up to and including it.
    """
    parent = _NO_PARENT if parent_hash is None else _HAS_PARENT + parent_hash.to_bytes(8, "little")
    payload = struct.pack(f"<{len(token_ids)}q", *token_ids)
    digest = hashlib.sha256(_HASH_SALT + parent + payload).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    """One block of ``block_size`` token slots in every layer's KV cache.

    Identity semantics (``eq=False``): two blocks are the same only if they are the same
    object. ``prev_free``/``next_free`` are the free-queue links, meaningful only while free.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly-linked list of free blocks in eviction order (head first); all ops O(1).

    Uses two sentinel blocks (ids -1) so that insertion and removal never special-case the
    ends.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVCacheBlock:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free blocks")
        self.remove(first)
        return first


class BlockPool:
    """Owns ``num_blocks`` blocks (block 0 reserved as the null block) and the prefix index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self._free = FreeBlockQueue(self.blocks[1:])
        self._cached: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``get_new_blocks`` can hand out, cached-but-free ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks (all but the null block) held by requests."""
        total = self.num_blocks - 1
        return (total - len(self._free)) / total

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (head first); O(n), for tests and debugging."""
        return [b.block_id for b in self._free]

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop ``num_blocks`` blocks from the head of the free queue, each with ``ref_cnt`` 1.

        A popped block that still held a cached hash loses it (evicted from the index), so a
        returned block never carries a hash. Raises ``ValueError`` without changing anything
        when fewer than ``num_blocks`` blocks are free.
        """
        if num_blocks > len(self._free):
            raise ValueError(f"asked for {num_blocks} blocks, only {len(self._free)} free")
        out: list[KVCacheBlock] = []
        for _ in range(num_blocks):
            block = self._free.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block (a prefix-cache hit).

        A free block leaves the free queue, so it cannot be evicted while referenced.
        """
        for block in blocks:
            if block is self.null_block:
                raise ValueError("the null block cannot be referenced")
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the given order.

        A block reaching ``ref_cnt`` 0 goes to the tail of the free queue keeping its hash,
        so the order given is the order in which they become evictable.
        """
        for block in blocks:
            if block.ref_cnt <= 0 or block is self.null_block:
                raise ValueError(f"block {block.block_id} is not in use")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: int) -> bool:
        """Register a full, in-use block under ``block_hash``; True if it is now indexed.

        If another block already holds this hash (two requests computed the same prefix
        independently), the index keeps the first one and ``block`` stays unhashed: the index
        must stay one-to-one. A block already carrying a hash is left as is.
        """
        if not self.enable_caching:
            return False
        if block.ref_cnt <= 0 or block is self.null_block:
            raise ValueError(f"block {block.block_id} is not in use")
        if block.block_hash is not None:
            return block.block_hash == block_hash
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """The block holding ``block_hash``, in use or free; None if evicted or never seen."""
        return self._cached.get(block_hash)

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forget a block's hash (its contents are not what the hash says, or not yet)."""
        self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
