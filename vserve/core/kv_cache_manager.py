"""Per-request block tables on top of the block pool, with automatic prefix caching.

A request's blocks cover its tokens in order: token ``t`` lives in block ``blocks[t // B]``
(``B = block_size``). Full blocks are registered in the prefix index under the chained hash
of their tokens *when they are allocated for the step that fills them*, not after the step
ran: the attention backend writes a layer's KV for the whole batch before any sequence reads
it, so a second request scheduled in the same step (n > 1, or an identical prompt) can
already share them.

That early registration is only safe if the step runs. A request freed before its scheduled
tokens were computed (preempted in the step that allocated them) drops the hashes of its
not-yet-computed blocks in ``free``, so nobody can later hit KV that was never written.
"""

from __future__ import annotations

from collections.abc import Sequence

from vserve.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from vserve.core.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks to requests and finds cached prefixes.

    Blocks returned by ``allocate_slots`` (and the hit blocks passed to it) are pinned, i.e.
    never handed to another request nor evicted, until ``free(request)``.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._req_blocks: dict[str, list[KVCacheBlock]] = {}
        # The id lists handed to the runner: one object per admission, appended in place.
        self._req_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request have been offered to the prefix index.
        self._num_cached_blocks: dict[str, int] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def _lookup_applies(self, request: Request) -> bool:
        # Prompt logprobs need the logits of every prompt position, which a hit would skip.
        return self.enable_prefix_caching and request.sampling_params.prompt_logprobs is None

    def _ensure_block_hashes(self, request: Request, num_tokens: int) -> list[int]:
        """Extend ``request.block_hashes`` to cover the full blocks of its first tokens.

        Tokens only ever get appended, so hashes computed once stay valid (across preemption
        too).
        """
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_tokens // bs):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks of ``request.all_token_ids``.

        Returns ``(blocks, num_tokens_they_hold)``. Never covers the whole sequence: at least
        the last token is left to compute so that the step yields logits. The blocks are not
        referenced yet; pass them to ``allocate_slots`` before anything else allocates, or
        they may be evicted.
        """
        if not self._lookup_applies(request):
            return [], 0
        hashes = self._ensure_block_hashes(request, request.num_tokens)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def has_room(self, request: Request, total: int, num_lookahead_tokens: int = 0) -> bool:
        """Whether ``allocate_slots`` for ``total`` tokens (computed ones included) and
        ``num_lookahead_tokens`` more would change nothing: the held blocks have room and
        no block becomes full (to register). Most decode steps; cheap enough to call per
        row per step."""
        held = self._req_block_ids.get(request.request_id)
        if held is None or num_lookahead_tokens < 0:
            return False
        bs = self.block_size
        return (total + num_lookahead_tokens <= len(held) * bs
                and total <= len(request.all_token_ids)
                and total + num_lookahead_tokens <= self.max_model_len
                and (not self.enable_prefix_caching
                     or total // bs <= self._num_cached_blocks[request.request_id]))

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Make the request hold blocks for ``num_computed_tokens + num_new_computed_tokens +
        num_new_tokens`` tokens; returns the newly allocated blocks (hits excluded).

        ``num_lookahead_tokens`` more slots are held beyond those, for positions whose token
        ids are not known yet (a chained step computes the token the step in flight is
        sampling); only blocks full of known tokens are ever registered for prefix caching.

        ``new_computed_blocks`` are prefix hits from ``get_computed_blocks`` holding
        ``num_new_computed_tokens`` tokens; they are referenced here. Returns None, changing
        nothing, when free blocks (cached-but-free ones count) do not suffice. On success every
        block that becomes full with the scheduled tokens is registered in the prefix index.
        """
        rid = request.request_id
        bs = self.block_size
        held = self._req_blocks.get(rid)
        num_held = len(held) if held is not None else 0
        total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        if not new_computed_blocks and self.has_room(request, total, num_lookahead_tokens):
            return []
        if (total > request.num_tokens or num_lookahead_tokens < 0
                or total + num_lookahead_tokens > self.max_model_len):
            raise ValueError(
                f"request {rid}: {total} + {num_lookahead_tokens} lookahead tokens asked, it "
                f"has {request.num_tokens} (max_model_len {self.max_model_len})"
            )
        if num_new_computed_tokens != len(new_computed_blocks) * bs:
            raise ValueError("num_new_computed_tokens must match the hit blocks")
        num_new_blocks = max(0, _cdiv(total + num_lookahead_tokens, bs) - num_held
                             - len(new_computed_blocks))
        # Hits on free blocks leave the free queue when touched: they use up free capacity too.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.block_pool.num_free_blocks:
            return None

        if held is None:
            held = self._req_blocks[rid] = []
            request.block_ids = self._req_block_ids[rid] = []
            self._num_cached_blocks[rid] = 0
            if self._lookup_applies(request):
                # Counted on admission, not per lookup: a request that waits for blocks and
                # looks up again every step is one query.
                self._queries += request.num_tokens
                self._hits += num_new_computed_tokens
        ids = self._req_block_ids[rid]
        # Touch before allocating: allocation must not evict the hits.
        self.block_pool.touch(new_computed_blocks)
        held.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        held.extend(new_blocks)
        ids.extend(b.block_id for b in new_computed_blocks)
        ids.extend(b.block_id for b in new_blocks)

        if self.enable_prefix_caching:
            self._cache_full_blocks(request, held, total)
        return new_blocks

    def _cache_full_blocks(self, request: Request, held: list[KVCacheBlock], total: int) -> None:
        rid = request.request_id
        start = self._num_cached_blocks[rid]
        num_full = total // self.block_size
        if num_full <= start:
            return
        hashes = self._ensure_block_hashes(request, total)
        for i in range(start, num_full):
            # Hit blocks already carry their hash; a hash held by another block is skipped.
            self.block_pool.cache_full_block(held[i], hashes[i])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first (so tail blocks are evicted first
        and shared prefixes last). A request holding no blocks is a no-op.

        Uses ``request.num_computed_tokens`` to tell computed blocks from blocks only
        scheduled: the latter lose their hash unless another request still holds them.
        """
        rid = request.request_id
        blocks = self._req_blocks.pop(rid, None)
        self._req_block_ids.pop(rid, None)
        request.block_ids = []
        self._num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        for block in blocks[request.num_computed_tokens // self.block_size :]:
            if block.block_hash is not None and block.ref_cnt == 1:
                self.block_pool.uncache_block(block)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block ids, as the live list the manager appends to.

        The same object until the request is freed (a preempted request gets a new one on
        re-admission). Raises ``KeyError`` if the request holds no blocks.
        """
        return self._req_block_ids[request_id]

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The request's blocks (a copy); empty if it holds none."""
        return list(self._req_blocks.get(request_id, ()))

    def make_prefix_cache_stats(self) -> tuple[int, int]:
        """``(queries, hits)`` in tokens since the last call; resets both."""
        out = (self._queries, self._hits)
        self._queries = self._hits = 0
        return out
