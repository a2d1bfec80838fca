"""KVCacheManager: prefix hits, the never-fully-cached rule, all-or-nothing allocation, free."""

import pytest

from jaxllm.core.kv_cache_manager import KVCacheManager
from tests.core.helpers import make_request

BS = 4


def run_prefill(kv, req, num_tokens=None):
    """Look up, allocate and mark computed as the scheduler would (no model)."""
    blocks, hit = kv.get_computed_blocks(req)
    n = (req.num_tokens - hit) if num_tokens is None else num_tokens
    assert kv.allocate_slots(req, n, blocks, hit) is not None
    req.num_computed_tokens = hit + n
    return hit


def test_shared_prefix_hits_full_blocks_only():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    a = make_request("a", list(range(10)))            # blocks [0..3] [4..7] [8 9]
    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert run_prefill(kv, a) == 0
    assert run_prefill(kv, b) == 8
    ia, ib = kv.get_block_ids(a), kv.get_block_ids(b)
    assert ia[:2] == ib[:2] and ia[2] != ib[2]
    blocks = kv.block_pool.blocks
    assert [blocks[i].ref_cnt for i in ia] == [2, 2, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)


def test_prompt_is_never_fully_cached():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    prompt = list(range(8))  # exactly two full blocks
    run_prefill(kv, make_request("a", prompt))
    blocks, hit = kv.get_computed_blocks(make_request("b", prompt))
    assert hit == 4 and len(blocks) == 1  # the last token (and its block) is recomputed


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False, max_model_len=64)
    run_prefill(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert not kv.block_pool.cached and kv.prefix_cache_queries == 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=5, block_size=BS, enable_prefix_caching=True, max_model_len=64)  # 4 usable
    a = make_request("a", list(range(12)))
    run_prefill(kv, a)  # 3 blocks
    b = make_request("b", list(range(100, 108)))
    before = (kv.num_free_blocks, [blk.ref_cnt for blk in kv.block_pool.blocks], dict(kv.block_pool.cached))
    assert kv.allocate_slots(b, 8) is None
    assert kv.get_block_ids(b) == []
    assert before == (kv.num_free_blocks, [blk.ref_cnt for blk in kv.block_pool.blocks],
                      dict(kv.block_pool.cached))
    assert kv.allocate_slots(b, 4) is not None and kv.num_free_blocks == 0


def test_hits_on_free_cached_blocks_count_against_free_space():
    kv = KVCacheManager(num_blocks=5, block_size=BS, enable_prefix_caching=True, max_model_len=64)  # 4 usable
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    kv.free(a)  # 3 free cached-or-partial blocks + 1 never used
    assert kv.num_free_blocks == 4
    b = make_request("b", list(range(8)) + [60, 61, 62, 63, 64, 65, 66, 67, 68])  # 17 tokens: 5 blocks
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8
    # Needs 3 new blocks, but taking the 2 hits out of the queue leaves only 2 free.
    assert kv.allocate_slots(b, b.num_tokens - hit, blocks, hit) is None
    # 9 tokens need 1 new block beyond the 2 hits: fits.
    c = make_request("c", list(range(8)) + [70])
    blocks, hit = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - hit, blocks, hit) is not None
    assert kv.get_block_ids(c)[:2] == [blk.block_id for blk in blocks]


def test_free_releases_in_reverse_order():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    a = make_request("a", list(range(12)))
    run_prefill(kv, a)
    table = kv.get_block_ids(a)
    kv.free(a)
    tail_of_queue = [b.block_id for b in kv.block_pool.free_queue][-3:]
    assert tail_of_queue == table[::-1]  # the last block is evicted first


def test_n_siblings_share_the_prompt_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    prompt = list(range(10))
    sibs = [make_request(f"s{i}", prompt) for i in range(3)]
    for s in sibs:  # same step: each allocation sees the previous one's cached blocks
        run_prefill(kv, s)
    tables = [kv.get_block_ids(s) for s in sibs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # the partial block is private
    assert kv.block_pool.blocks[tables[0][0]].ref_cnt == 3
    assert [s.num_computed_tokens for s in sibs] == [10, 10, 10]


def test_decode_blocks_get_cached_when_full():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    a = make_request("a", list(range(6)))
    run_prefill(kv, a)
    assert len(kv.block_pool.cached) == 1
    for tok in (90, 91):
        a.append_output_token_ids([tok])
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    assert len(kv.block_pool.cached) == 2  # tokens 4..7 = [4, 5, 90, 91] now shareable
    b = make_request("b", list(range(6)) + [90, 91, 5])
    assert kv.get_computed_blocks(b)[1] == 8


def test_free_uncaches_blocks_whose_kv_was_never_computed():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None  # scheduled, cached, but then preempted
    assert len(kv.block_pool.cached) == 3
    kv.free(a)  # num_computed_tokens is still 0: nothing was written
    assert not kv.block_pool.cached


def test_max_model_len_caps_slots_and_can_fit():
    kv = KVCacheManager(num_blocks=11, block_size=BS, enable_prefix_caching=False, max_model_len=10)
    a = make_request("a", list(range(8)))
    kv.allocate_slots(a, 20)
    assert len(kv.get_block_ids(a)) == 3  # 10 tokens, not 20
    assert kv.can_fit(40) and not kv.can_fit(41)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0, enable_prefix_caching=True, max_model_len=8)
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True, max_model_len=8)
    a = make_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots(a, -1)
    with pytest.raises(ValueError, match="num_new_computed_tokens"):
        kv.allocate_slots(a, 1, [], 4)


def test_reset_prefix_cache_drops_all_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    run_prefill(kv, make_request("a", list(range(9))))
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=True, max_model_len=64)
    run_prefill(kv, make_request("a", list(range(9))))
    # Every prompt position needs logits, and cached tokens have none.
    assert kv.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 8
