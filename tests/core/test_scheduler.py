"""Scheduler: token budget, chunked prefill, prefix sharing, preemption, policies, aborts, stops."""

import pytest

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_output import ModelRunnerOutput
from jaxllm.request import RequestStatus
from tests.core.helpers import EOS, fake_output, make_request, make_scheduler, sched_tokens, step


def run_to_completion(sched, max_steps=200, token=7):
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return
        step(sched, token)
    raise AssertionError("requests did not finish")


def assert_all_free(sched):
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)


# ---- token budget ----------------------------------------------------------------------------
def test_chunked_prefill_under_a_small_budget():
    sched = make_scheduler(max_num_batched_tokens=16)
    req = make_request("r", list(range(50)), max_tokens=3)
    sched.add_request(req)
    chunks, samples = [], []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        (sr,) = out.scheduled
        assert out.total_num_scheduled_tokens == sr.num_scheduled_tokens <= 16
        chunks.append(sr.num_scheduled_tokens)
        samples.append(sr.samples)  # read before update_from_output appends the new token
        changed = sched.update_from_output(out, fake_output(out))
        assert (req in changed) == samples[-1]
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert samples == [False, False, False, True, True, True]
    assert req.output_token_ids == [7, 7, 7] and req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_running_requests_first_then_a_chunk_of_a_new_one():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", list(range(10)), max_tokens=20))
    step(sched)
    sched.add_request(make_request("b", list(range(100, 140)), max_tokens=20))
    out, _ = step(sched)
    assert [sr.request_id for sr in out.scheduled] == ["a", "b"]
    assert sched_tokens(out) == {"a": 1, "b": 15}
    assert out.scheduled[1].block_ids == sched.kv_cache_manager.get_block_ids(out.scheduled[1].request)


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", [i + 10] * 5, max_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched)
    assert set(sched_tokens(out)) == {"r0", "r1"} and len(sched.running) == 2
    out, _ = step(sched)  # r0, r1 finish here
    assert set(sched_tokens(out)) == {"r0", "r1"}
    out, _ = step(sched)
    assert set(sched_tokens(out)) == {"r2"} and out.finished_req_ids == {"r0", "r1"}


# ---- prefix cache ----------------------------------------------------------------------------
def test_n_siblings_share_prompt_blocks_in_the_same_step():
    sched = make_scheduler(block_size=8)
    sibs = [make_request(f"p#{i}", list(range(20)), max_tokens=4) for i in range(3)]
    for s in sibs:
        sched.add_request(s)
    out, _ = step(sched)
    assert sched_tokens(out) == {"p#0": 20, "p#1": 4, "p#2": 4}
    assert [s.num_cached_tokens for s in sibs] == [0, 16, 16]
    tables = [sr.block_ids for sr in out.scheduled]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    pool = sched.kv_cache_manager.block_pool
    assert [pool.blocks[i].ref_cnt for i in tables[0][:2]] == [3, 3]
    stats = sched.stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (60, 32)
    run_to_completion(sched)
    assert_all_free(sched)


def test_later_request_hits_a_finished_requests_prefix():
    sched = make_scheduler(block_size=8)
    sched.add_request(make_request("a", list(range(24)), max_tokens=1))
    run_to_completion(sched)
    b = make_request("b", list(range(24)) + [99], max_tokens=1)
    sched.add_request(b)
    out, _ = step(sched)
    assert b.num_cached_tokens == 24 and sched_tokens(out) == {"b": 1}


# ---- preemption ------------------------------------------------------------------------------
def _pressure_setup(policy):
    """7 usable blocks of 8 tokens. Running order [lo, hi, mid]; hi needs a 3rd block in step 3."""
    sched = make_scheduler(num_blocks=8, block_size=8, policy=policy)
    lo = make_request("lo", list(range(16)), max_tokens=8, priority=5, arrival_time=0.0)
    hi = make_request("hi", list(range(100, 116)), max_tokens=8, priority=0, arrival_time=1.0)
    mid = make_request("mid", list(range(200, 212)), max_tokens=8, priority=1, arrival_time=2.0)
    sched.add_request(lo)
    step(sched)
    sched.add_request(hi)
    sched.add_request(mid)
    step(sched)
    assert sched.running == [lo, hi, mid] and sched.kv_cache_manager.num_free_blocks == 0
    # A request already waiting: the victim must still be put in front of it.
    sched.add_request(make_request("late", [40, 41], max_tokens=2, priority=9, arrival_time=3.0))
    return sched, lo, hi, mid


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_picks_the_policys_victim(policy):
    sched, lo, hi, mid = _pressure_setup(policy)
    out = sched.schedule()
    victim = mid if policy == "fcfs" else lo  # fcfs: last running; priority: worst priority
    assert out.preempted_req_ids == {victim.request_id}
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert victim not in sched.running and [r.request_id for r in sched.waiting] == [victim.request_id, "late"]
    assert sched.kv_cache_manager.get_block_ids(victim) == []
    # With priority the victim had already been scheduled this step: it is taken back out.
    assert set(sched_tokens(out)) == {"lo", "hi", "mid"} - {victim.request_id}
    assert out.total_num_scheduled_tokens == 2
    assert sched.stats()["num_preemptions"] == 1
    sched.update_from_output(out, fake_output(out))
    run_to_completion(sched)
    for r in (lo, hi, mid):
        assert r.output_token_ids == [7] * 8 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert victim.num_preemptions >= 1
    assert_all_free(sched)


def test_the_last_running_request_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=8)  # 3 usable
    a = make_request("a", list(range(8)), max_tokens=8)
    b = make_request("b", list(range(50, 58)), max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # 1 block each, both now hold 9 tokens
    out, _ = step(sched)  # a takes the last free block; b has none and is itself the fcfs victim
    assert sched_tokens(out) == {"a": 1} and out.preempted_req_ids == {"b"}
    assert b.status == RequestStatus.PREEMPTED and b.output_token_ids == [7]
    run_to_completion(sched)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert_all_free(sched)


# ---- policies --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,expected", [("priority", ["b", "c", "d", "a"]), ("fcfs", ["a", "b", "c", "d"])])
def test_waiting_order(policy, expected):
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    for rid, prio in [("a", 2), ("b", 0), ("c", 0), ("d", 1)]:
        sched.add_request(make_request(rid, [1, 3, 5], max_tokens=1, priority=prio))
    order = []
    while sched.has_unfinished_requests():
        out, _ = step(sched)
        order += [sr.request_id for sr in out.scheduled]
    assert order == expected


# ---- admission -------------------------------------------------------------------------------
def test_refuses_requests_that_can_never_fit():
    sched = make_scheduler(num_blocks=5, block_size=8, max_model_len=64)  # 4 usable blocks = 32 tokens
    with pytest.raises(ValueError, match="prompt"):
        sched.add_request(make_request("empty", [], max_tokens=1))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("long", list(range(60)), max_tokens=5))
    with pytest.raises(ValueError, match="blocks"):
        sched.add_request(make_request("big", list(range(30)), max_tokens=5))
    sched.add_request(make_request("ok", list(range(28)), max_tokens=4))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(make_request("ok", [1], max_tokens=1))
    assert sched.get_num_unfinished_requests() == 1


def test_scheduler_needs_resolved_config():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(max_num_batched_tokens=8), CacheConfig(), 16)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(SchedulerConfig(max_model_len=8), CacheConfig(), 16)


# ---- abort -----------------------------------------------------------------------------------
def test_abort_waiting_and_running():
    sched = make_scheduler(max_num_seqs=1)
    a = make_request("a", list(range(20)), max_tokens=5)
    b = make_request("b", list(range(20)), max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert a.get_finished_reason() == "abort"
    assert not sched.has_unfinished_requests() and not sched.running and len(sched.waiting) == 0
    assert_all_free(sched)
    out = sched.schedule()
    assert out.is_empty and out.finished_req_ids == {"a", "b"}
    assert sched.schedule().finished_req_ids == set()
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # already gone: ignored
    with pytest.raises(ValueError, match="status"):
        sched.finish_requests("a", RequestStatus.RUNNING)


def test_update_skips_requests_aborted_after_scheduling():
    sched = make_scheduler()
    a = make_request("a", [1, 3, 5], max_tokens=5)
    sched.add_request(a)
    out = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, fake_output(out)) == [] and a.output_token_ids == []


# ---- stops -----------------------------------------------------------------------------------
def _run_one(tokens, **kw):
    """Run one request; the fake model emits ``tokens`` one per step (then 7s)."""
    sched = make_scheduler()
    req = make_request("r", [1, 3, 5], **kw)
    sched.add_request(req)
    it = iter(tokens)
    for _ in range(50):
        if not sched.has_unfinished_requests():
            break
        step(sched, next(it, 7))
    assert not sched.has_unfinished_requests() and sched.running == []
    assert_all_free(sched)
    return req


def test_eos_stops():
    req = _run_one([4, EOS, 4], max_tokens=8)
    assert req.output_token_ids == [4, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    req = _run_one([EOS] * 8, max_tokens=4, ignore_eos=True)
    assert req.output_token_ids == [EOS] * 4 and req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_stop_token_ids_set_stop_reason():
    req = _run_one([4, 9, 4], max_tokens=8, stop_token_ids=[9])
    assert req.output_token_ids == [4, 9] and req.stop_reason == 9
    assert req.get_finished_reason() == "stop"


def test_min_tokens_suppresses_stops_until_reached():
    req = _run_one([EOS, 9, EOS, EOS], max_tokens=8, min_tokens=3, stop_token_ids=[9])
    assert req.output_token_ids == [EOS, 9, EOS] and req.status == RequestStatus.FINISHED_STOPPED


def test_eos_on_the_last_allowed_token_is_a_stop():
    req = _run_one([4, EOS], max_tokens=2)
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_caps_length():
    sched = make_scheduler(max_model_len=8)
    req = make_request("r", [1, 3, 5], max_tokens=5)
    sched.add_request(req)
    req.max_tokens = 100  # bypass the admission check to reach the model-length cap
    run_to_completion(sched)
    assert req.num_tokens == 8 and req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_tokens_after_a_stop_in_one_step_are_dropped():
    sched = make_scheduler()
    req = make_request("r", [1, 3, 5], max_tokens=8)
    sched.add_request(req)
    _, changed = step(sched, per_request={"r": [4, EOS, 6]})
    assert changed == [req] and req.output_token_ids == [4, EOS] and req.is_finished()


def test_stats_reports_the_state():
    sched = make_scheduler(num_blocks=33, max_num_seqs=1)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", list(range(10)), max_tokens=3))
    step(sched)
    s = sched.stats()
    assert s == {"kv_blocks_total": 32, "kv_blocks_free": 30, "prefix_cache_queries": 10,
                 "prefix_cache_hits": 0, "num_preemptions": 0, "num_requests_running": 1,
                 "num_requests_waiting": 2}


def test_a_sampling_step_without_a_token_is_recomputed():
    sched = make_scheduler()
    req = make_request("r", [1, 3, 5, 9], max_tokens=2)
    sched.add_request(req)
    out = sched.schedule()
    assert sched.update_from_output(out, ModelRunnerOutput()) == []  # the runner returned nothing
    assert req.num_computed_tokens == 3 and req.output_token_ids == []
    out, _ = step(sched)
    assert sched_tokens(out) == {"r": 1} and out.scheduled[0].num_computed_tokens == 3
    assert req.output_token_ids == [7]
