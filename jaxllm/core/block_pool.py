"""KV blocks, the free LRU queue, reference counts and the prefix cache (hash -> block).

Life of a block (ids ``1 .. num_blocks-1``; block 0 is the reserved *null block*, see below):

* free, uncached:  ``ref_cnt == 0``, ``block_hash is None``, in the free queue.
* in use:          ``ref_cnt >= 1`` (one per request holding it), not in the free queue.
* in use, cached:  full block whose KV is (or this step will be) written; ``block_hash`` set and
  ``cached[block_hash] is block``, so another request with the same prefix can ``touch`` it.
* free, cached:    ``ref_cnt == 0`` but still in ``cached``: its KV stays valid until the block is
  handed out again. It sits in the free queue in LRU order; a prefix hit takes it out of the queue
  (``touch``), an allocation that pops it evicts it from ``cached``.

The null block (id 0) is never handed out and never freed. The runner pads page tables with
page 0, so a padded entry can never alias a live request's KV. Usable blocks: ``num_blocks - 1``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from jaxllm.request import Request

NULL_BLOCK_ID = 0


class KVCacheBlock:
    """One page of the paged KV cache (metadata only: the KV itself lives on the device)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        # Chained hash of the block's tokens while it is registered in the prefix cache.
        self.block_hash: int | None = None
        # Links of the free queue (None when not in it).
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else ", cached"
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order: head = least recently freed.

    ``append``, ``popleft`` and ``remove`` (from anywhere, for a prefix hit on a free cached
    block) are all O(1). Two sentinels make every real block have both neighbours.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]):
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
        while node is not self._tail:
            yield node
            node = node.next_free

    def __contains__(self, block: KVCacheBlock) -> bool:
        return block.prev_free is not None

    def append(self, block: KVCacheBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> KVCacheBlock:
        if self._len == 0:
            raise ValueError("no free blocks")
        block = self._head.next_free
        self.remove(block)
        return block


class BlockPool:
    """All KV blocks of one cache, with ref counting and an optional prefix cache.

    Args:
        num_blocks: pages in the device KV cache, including the reserved null block 0.
        enable_caching: keep full blocks in the hash map so later requests can reuse them.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks: must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[int, KVCacheBlock] = {}
        # Prefix-cache counters, in tokens as vLLM counts them (one query per first scheduling).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.evictions = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free cached blocks count: they can be evicted)."""
        return len(self.free_queue)

    def get_usage(self) -> float:
        """Fraction of usable blocks held by requests, in [0, 1]."""
        return 1.0 - len(self.free_queue) / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop ``num_blocks`` from the head of the free queue (LRU first), evicting cached ones."""
        if num_blocks > len(self.free_queue):
            raise ValueError(f"num_blocks: asked for {num_blocks}, only {len(self.free_queue)} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._uncache(block)
                self.evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]`` under the request's hashes.

        ``request.block_hashes`` must already cover ``num_full_blocks`` blocks. A block that is
        already cached (a prefix hit) is skipped; when another block already holds the same hash
        (two requests computed the same prefix independently) the first one stays the cached copy.
        """
        if not self.enable_caching:
            return
        if num_full_blocks > len(request.block_hashes):
            raise ValueError(f"num_full_blocks: {num_full_blocks} exceeds the "
                             f"{len(request.block_hashes)} hashed blocks of {request.request_id!r}")
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            block_hash = request.block_hashes[i]
            if block_hash in self.cached:
                continue
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on (prefix-hit) blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0 and block is not self.null_block:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference on each block, in the order given; at 0 it joins the queue tail.

        Callers pass a request's blocks in reverse so its tail blocks (the least shareable) are
        evicted before its prefix blocks.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id}: ref_cnt is {block.ref_cnt}, cannot free")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def uncache(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Forget the hash of blocks whose KV will not be written (their request was preempted)."""
        for block in blocks:
            if block.block_hash is not None:
                self._uncache(block)

    def _uncache(self, block: KVCacheBlock) -> None:
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights). Blocks in use keep their KV."""
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens
