"""Scheduler.schedule_decode_steps: several decode tokens per request in one step."""

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_output import ModelRunnerOutput
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams


def _sched(num_blocks=32):
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128),
                     CacheConfig(block_size=4), num_blocks)


def _req(rid, n_prompt, max_tokens, eos=frozenset()):
    start = 10 + 100 * (ord(rid[0]) - ord("a"))  # distinct prompts: no prefix sharing
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, eos_token_ids=eos)


def _prefill(s):
    so = s.schedule()
    s.update_from_output(so, ModelRunnerOutput(sampled_token_ids={sr.request_id: [7] for sr in so.scheduled}))


def test_only_when_all_running_requests_decode():
    s = _sched()
    s.add_request(_req("a", 5, 20))
    assert s.schedule_decode_steps(8) is None  # still waiting
    _prefill(s)
    s.add_request(_req("b", 3, 20))
    assert s.schedule_decode_steps(8) is None  # b waits
    _prefill(s)
    so = s.schedule_decode_steps(8)
    assert so is not None and so.num_decode_steps == 8
    assert {sr.request_id: sr.num_scheduled_tokens for sr in so.scheduled} == {"a": 8, "b": 8}


def test_steps_capped_by_max_tokens_stops_truncate_and_blocks_balance():
    s = _sched()
    s.add_request(_req("a", 5, 4, eos=frozenset({99})))
    s.add_request(_req("b", 6, 30, eos=frozenset({99})))
    _prefill(s)  # each has 1 output token now
    so = s.schedule_decode_steps(8)
    steps = {sr.request_id: sr.num_scheduled_tokens for sr in so.scheduled}
    assert steps == {"a": 3, "b": 8}  # a may make only 3 more tokens
    for sr in so.scheduled:  # KV for every scheduled position is allocated
        assert len(sr.block_ids) * 4 >= sr.num_computed_tokens + sr.num_scheduled_tokens
    out = ModelRunnerOutput(sampled_token_ids={"a": [1, 2, 3], "b": [5, 99, 6, 6, 6, 6, 6, 6]})
    s.update_from_output(so, out)
    assert not s.has_unfinished_requests()
    total = s.kv_cache_manager.num_total_blocks
    assert s.kv_cache_manager.num_free_blocks == total


def test_falls_back_when_blocks_do_not_fit():
    s = _sched(num_blocks=6)  # 5 usable blocks of 4 tokens
    s.add_request(_req("a", 7, 12))
    s.add_request(_req("b", 7, 12))
    _prefill(s)  # 2 blocks each, 1 free
    assert s.schedule_decode_steps(8) is None
    free_before = s.kv_cache_manager.num_free_blocks
    assert free_before == 1
