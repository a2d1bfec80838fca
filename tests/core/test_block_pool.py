"""BlockPool and FreeBlockQueue: LRU order, ref counts, eviction of cached free blocks."""

import pytest

from jaxllm.core.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock
from jaxllm.core.hashing import update_block_hashes
from tests.core.helpers import make_request


def ids(blocks):
    return [b.block_id for b in blocks]


def test_free_queue_remove_from_middle_keeps_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    assert ids(q) == [1, 3, 4] and len(q) == 3
    q.append(blocks[2])
    assert ids(q) == [1, 3, 4, 2]
    assert q.popleft() is blocks[1]
    assert blocks[1] not in q and blocks[3] in q
    with pytest.raises(ValueError):
        q.remove(blocks[1])
    with pytest.raises(ValueError):
        q.append(blocks[3])


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.num_usable_blocks == 3 and pool.get_num_free_blocks() == 3
    got = pool.get_new_blocks(3)
    assert NULL_BLOCK_ID not in ids(got)
    with pytest.raises(ValueError, match="num_blocks"):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)


def test_allocation_is_lru_in_free_order():
    pool = BlockPool(6)
    a, b, c, d, e = pool.get_new_blocks(5)
    pool.free_blocks([c, a, e])
    assert ids(pool.free_queue) == [c.block_id, a.block_id, e.block_id]
    assert ids(pool.get_new_blocks(2)) == [c.block_id, a.block_id]


def test_ref_counts_and_usage():
    pool = BlockPool(5)
    a, b = pool.get_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt) == (1, 1)
    assert pool.get_usage() == pytest.approx(2 / 4)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and a not in pool.free_queue
    pool.free_blocks([a, b])
    assert a.ref_cnt == b.ref_cnt == 0 and pool.get_usage() == 0.0
    with pytest.raises(ValueError, match="ref_cnt"):
        pool.free_blocks([a])


def _cached_pool(num_blocks=6, block_size=4):
    """A pool whose first two allocated blocks hold a cached 8-token prompt, now freed."""
    pool = BlockPool(num_blocks)
    req = make_request("r", list(range(10)))
    update_block_hashes(req, block_size)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(req, blocks, 0, 2)
    return pool, req, blocks


def test_cache_full_blocks_and_lookup():
    pool, req, blocks = _cached_pool()
    assert pool.get_cached_block(req.block_hashes[0]) is blocks[0]
    assert pool.get_cached_block(req.block_hashes[1]) is blocks[1]
    assert blocks[2].block_hash is None  # partial block: never cached
    # A second block with the same hash does not replace the cached one.
    other = pool.get_new_blocks(1)
    pool.cache_full_blocks(req, [other[0]], 0, 1)
    assert pool.get_cached_block(req.block_hashes[0]) is blocks[0] and other[0].block_hash is None


def test_touch_revives_a_free_cached_block():
    pool, req, blocks = _cached_pool()
    pool.free_blocks(reversed(blocks))
    assert blocks[0] in pool.free_queue
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 1 and blocks[0] not in pool.free_queue
    assert pool.get_cached_block(req.block_hashes[0]) is blocks[0]


def test_popping_a_cached_free_block_evicts_it():
    pool, req, blocks = _cached_pool(num_blocks=4)  # 3 usable, all allocated
    pool.free_blocks(reversed(blocks))  # queue: blocks[2], blocks[1], blocks[0]
    assert pool.evictions == 0
    first = pool.get_new_blocks(2)  # the partial block, then the second cached block
    assert ids(first) == [blocks[2].block_id, blocks[1].block_id]
    assert pool.get_cached_block(req.block_hashes[1]) is None and blocks[1].block_hash is None
    assert pool.get_cached_block(req.block_hashes[0]) is blocks[0]  # prefix survives longest
    assert pool.evictions == 1


def test_uncache_and_reset():
    pool, req, blocks = _cached_pool()
    pool.uncache([blocks[1]])
    assert pool.get_cached_block(req.block_hashes[1]) is None and blocks[1].block_hash is None
    pool.reset_prefix_cache()
    assert not pool.cached and blocks[0].block_hash is None
    assert blocks[0].ref_cnt == 1  # blocks in use are untouched
