"""Per-request block tables on top of the BlockPool: prefix-cache lookup, allocate, free.

A request's block table is a list of blocks; token ``t`` of the request lives in block
``t // block_size`` at offset ``t % block_size``. The table only grows while the request runs and is
released as a whole when it finishes or is preempted (recompute: no swapping).

Prefix caching: full blocks are registered under their chained hash (``jaxllm.core.hashing``) as
soon as the tokens filling them are *scheduled*: the runner writes every token's KV before that
layer's attention, so a request scheduled later in the same step may already share them (n > 1
siblings do exactly that).
"""

from __future__ import annotations

from jaxllm.core.block_pool import BlockPool, KVCacheBlock
from jaxllm.core.hashing import update_block_hashes
from jaxllm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of all live requests.

    Args:
        num_blocks: pages in the device KV cache; block 0 is reserved (``num_blocks - 1`` usable).
        block_size: tokens per page.
        enable_prefix_caching: reuse full blocks across requests with the same prefix.
        max_model_len: no request is given slots past this many tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int):
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {max_model_len}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}  # the same tables as ids, for the runner
        # How many leading blocks of each request have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        """Usable blocks (the null block excluded)."""
        return self.block_pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` tokens could fit in the whole (empty) pool."""
        return cdiv(num_tokens, self.block_size) <= self.num_total_blocks

    # ---- lookup / allocate / free ------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks: ``(blocks, num_computed_tokens)``.

        Capped at ``num_tokens - 1`` tokens so the last token is always recomputed and the step
        has logits to sample from. Takes no references: pass the result to ``allocate_slots``.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            # Prompt logprobs need logits at every prompt position: cached tokens have none.
            return [], 0
        hashes = update_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_new_computed_tokens: int = 0) -> list[int] | None:
        """Grow the request's table to hold ``num_computed + num_new_computed + num_new_tokens``.

        Args:
            request: the request; ``request.num_computed_tokens`` is its KV before this step.
            num_new_tokens: tokens scheduled this step (their KV is written this step).
            new_computed_blocks: prefix-cache hits from ``get_computed_blocks`` (first
                scheduling only); they get a reference here.
            num_new_computed_tokens: tokens those blocks hold (``len(blocks) * block_size``).

        Returns:
            The ids of the newly allocated blocks, or None when the pool is short of blocks, in
            which case nothing has changed.
        """
        new_computed_blocks = list(new_computed_blocks or [])
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens: must be >= 0, got {num_new_tokens}")
        if num_new_computed_tokens != len(new_computed_blocks) * self.block_size:
            raise ValueError(f"num_new_computed_tokens: must be len(new_computed_blocks) * block_size = "
                             f"{len(new_computed_blocks) * self.block_size}, got {num_new_computed_tokens}")
        rid = request.request_id
        req_blocks = self.req_to_blocks.get(rid)
        first_allocation = req_blocks is None and request.num_computed_tokens == 0
        if new_computed_blocks and not first_allocation:
            raise ValueError(f"new_computed_blocks: only allowed at the first allocation of {rid!r}")
        num_held = 0 if req_blocks is None else len(req_blocks)

        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_slots = min(num_computed + num_new_tokens, self.max_model_len)
        num_new_blocks = max(0, cdiv(num_slots, self.block_size) - num_held - len(new_computed_blocks))
        # Hits on free cached blocks take those blocks out of the free queue.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0) if new_computed_blocks else 0
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[rid] = []
            self.req_to_block_ids[rid] = []
            if self.enable_prefix_caching:
                self.block_pool.record_prefix_query(request.num_tokens, num_new_computed_tokens)
        block_ids = self.req_to_block_ids[rid]
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            block_ids.extend(b.block_id for b in new_computed_blocks)
        new_ids = []
        if num_new_blocks:
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            new_ids = [b.block_id for b in new_blocks]
            req_blocks.extend(new_blocks)
            block_ids.extend(new_ids)

        if self.enable_prefix_caching:
            num_full = min(num_computed + num_new_tokens, request.num_tokens) // self.block_size
            start = self.num_cached_blocks.get(rid, 0)
            if num_full > start:
                update_block_hashes(request, self.block_size)
                self.block_pool.cache_full_blocks(request, req_blocks, start, num_full)
                self.num_cached_blocks[rid] = num_full
        return new_ids

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its prefix stays cached longest.

        Call it *before* resetting ``num_computed_tokens`` on preemption: cached blocks past the
        request's computed tokens were registered this step for KV that will now never be written,
        so their hashes are dropped (the pool must never serve a block with stale KV).
        """
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, [])
        self.req_to_block_ids.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        num_valid = request.num_computed_tokens // self.block_size
        self.block_pool.uncache(blocks[num_valid:])
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request: Request) -> list[int]:
        """A copy of the request's block table (block ids)."""
        return list(self.req_to_block_ids.get(request.request_id, ()))

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (e.g. after new weights). Blocks of live requests are not
        offered to the cache again: their KV may come from the old weights."""
        self.block_pool.reset_prefix_cache()
        for rid in self.num_cached_blocks:
            self.num_cached_blocks[rid] = len(self.req_to_blocks.get(rid, ()))

    # ---- counters ----------------------------------------------------------------------------
    @property
    def prefix_cache_queries(self) -> int:
        return self.block_pool.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.block_pool.prefix_cache_hits
