"""Async scheduling (step t+1 dispatched before step t's tokens are read) gives the same tokens as the
synchronous engine: mixed prompt lengths, chunked prefill, stop tokens and max_tokens finishing at
different steps, an abort mid-run, preemption, n > 1, seeded sampling, penalties (synchronous
fallback), min_tokens and logprobs. Every KV block is free afterwards and nothing recompiles."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.request import RequestStatus

# A 16-token budget (chunked prefill) and a cache so small that requests are preempted (7 usable
# blocks of 16 tokens for 8 requests of up to 75 tokens); multi-step decode on (the default) or off
# (every decode step is overlapped with the host work of the one before: the serving case).
CONFIGS = {
    "multi_step": dict(max_num_seqs=8, max_num_batched_tokens=16, num_kv_blocks=8),
    "single_step": dict(max_num_seqs=8, max_num_batched_tokens=16, num_kv_blocks=8, num_decode_steps=1),
}


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    shared = rng.integers(3, 320, size=34).tolist()  # a shared prefix: prefix-cache hits
    prompts = [[1] + shared + rng.integers(3, 320, size=n).tolist() for n in (2, 13)]
    prompts += [[1] + rng.integers(3, 320, size=n).tolist() for n in (1, 4, 9, 20, 37, 50)]
    return prompts


@pytest.fixture(scope="module", params=list(CONFIGS))
def engines(request, tiny_llama_dir):
    """(sync LLM, async LLM) with the same configuration."""
    kw = dict(dtype="float32", progress=False, **CONFIGS[request.param])
    return (request.param, LLM(tiny_llama_dir, async_scheduling=False, **kw),
            LLM(tiny_llama_dir, async_scheduling=True, **kw))


def _drive(llm: LLM, prompts, params, abort_id: str | None = None, abort_after: int = 3):
    """Run requests step by step (aborting ``abort_id`` after ``abort_after`` steps); final outputs."""
    engine = llm.llm_engine
    before = engine.num_compilations
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        if steps == abort_after and abort_id is not None:
            engine.abort_request(abort_id)
        assert steps < 500, "engine does not finish"
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert all(b.ref_cnt == 0 for b in engine.scheduler.kv_cache_manager.block_pool.blocks)
    assert engine.num_compilations == before
    assert not engine.scheduler._pending  # no token is left counted as in flight
    return [done[str(i)] for i in range(len(prompts))], stats


def _tokens(outs):
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def test_greedy_mixed_workload_same_tokens(engines):
    _, sync, asy = engines
    prompts = _prompts()
    plain = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) for _ in prompts]
    ref, _ = _drive(sync, prompts, plain)
    ref_toks = [o.outputs[0].token_ids for o in ref]
    # Stop at a token the request really generates (at different steps), or by length; one request
    # asks for logprobs, one for n=2.
    params = []
    for i, toks in enumerate(ref_toks):
        if i % 3 == 0:
            sp = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[toks[2 + i]])
        else:
            sp = SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True,
                                logprobs=3 if i == 1 else None, n=2 if i == 4 else 1)
        params.append(sp)
    out_sync, st_sync = _drive(sync, prompts, params, abort_id="5")
    out_async, st_async = _drive(asy, prompts, params, abort_id="5")
    assert st_async["num_preemptions"] > 0 and st_sync["num_preemptions"] > 0
    # Most async steps ran while the one before was in flight; no sync step ever did.
    assert st_async["num_steps_overlapped"] > st_async["num_steps"] // 2 and st_sync["num_steps_overlapped"] == 0
    for i, (a, b) in enumerate(zip(out_sync, out_async)):
        if str(i) == "5":  # aborted mid-run: both a prefix of the full greedy sequence
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason == "abort"
            assert b.outputs[0].token_ids == ref_toks[i][:len(b.outputs[0].token_ids)]
            assert a.outputs[0].token_ids == ref_toks[i][:len(a.outputs[0].token_ids)]
            continue
        assert _tokens([a]) == _tokens([b]), f"request {i}"
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
        assert [c.stop_reason for c in a.outputs] == [c.stop_reason for c in b.outputs]
        assert b.outputs[0].token_ids == ref_toks[i][:len(b.outputs[0].token_ids)]
        if i % 3 == 0:  # stopped on its stop token (or an earlier EOS): nothing after it is emitted
            last = b.outputs[0].token_ids[-1]
            assert b.outputs[0].finish_reason == "stop"
            assert last == ref_toks[i][2 + i] or last in asy.llm_engine.eos_token_ids
            assert len(b.outputs[0].token_ids) <= 3 + i
        else:
            assert len(b.outputs[0].token_ids) == 3 + 2 * i
    lp_a, lp_b = out_sync[1].outputs[0].logprobs, out_async[1].outputs[0].logprobs
    assert len(lp_a) == len(lp_b) == 5
    for da, db in zip(lp_a, lp_b):
        assert da.keys() == db.keys()
        np.testing.assert_allclose([da[k] for k in da], [db[k] for k in da], atol=1e-4)


def test_sampling_features_same_tokens(engines):
    """Seeded sampling (per-token keys), penalties (the engine falls back to a synchronous step),
    min_tokens bans and prompt logprobs give the same results with async scheduling."""
    _, sync, asy = engines
    prompts = _prompts()[:6]
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.5, presence_penalty=0.3,
                             ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.0, min_tokens=6, stop_token_ids=list(range(3, 320))),
              SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=1.0, top_k=20, seed=3, n=2, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    out_sync, st_sync = _drive(sync, prompts, params)
    out_async, st_async = _drive(asy, prompts, params)
    assert _tokens(out_sync) == _tokens(out_async)
    assert st_async["num_sync_fallbacks"] > 0 and st_sync["num_sync_fallbacks"] == 0  # the penalty row
    # min_tokens=6 with every token a stop token: it stops at exactly the 6th token.
    assert len(out_async[2].outputs[0].token_ids) == 6 and out_async[2].outputs[0].finish_reason == "stop"
    pl_a, pl_b = out_sync[3].prompt_logprobs, out_async[3].prompt_logprobs
    assert len(pl_b) == len(prompts[3]) and pl_b[0] is None
    for da, db in zip(pl_a[1:], pl_b[1:]):
        np.testing.assert_allclose(sorted(da.values()), sorted(db.values()), atol=1e-4)


def test_host_timings_in_stats(engines):
    _, sync, asy = engines
    for llm in (sync, asy):
        before = llm.stats()
        llm.generate([_prompts()[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
        s = llm.stats()
        assert s["num_steps"] > before["num_steps"]
        parts = ("time_schedule_s", "time_pack_s", "time_dispatch_s", "time_postprocess_s")
        assert all(s[k] > before[k] for k in parts + ("time_wait_s",)), s
        assert s["time_host_s"] == pytest.approx(sum(s[k] for k in parts))


# ---- the scheduler alone (no jax): async order vs sync order over random workloads -------------

def _fake_next(history: list[int]) -> int:
    """A deterministic 'model': the next token depends only on the history (EOS = 2 now and then)."""
    v = (sum(history) * 31 + 7 * len(history)) % 97
    return 2 if v % 23 == 0 else 3 + v


def _fake_run(so, sampled_rows):
    from jaxllm.core.scheduler_output import ModelRunnerOutput
    out = ModelRunnerOutput()
    for sr in so.scheduled:
        if sr.request_id not in sampled_rows:
            continue
        hist, toks = list(sr.request.all_token_ids), []
        for _ in range(sampled_rows[sr.request_id]):
            toks.append(_fake_next(hist))
            hist.append(toks[-1])
        out.sampled_token_ids[sr.request_id] = toks
    return out


def _check_packable(so, prev_sampled: dict[str, int]) -> None:
    """What the runner does at dispatch: every chunk's tokens are known, or its one last token is
    sampled by the step in flight (pack_batch raises otherwise)."""
    from jaxllm.core.scheduler_output import ScheduledRequest, SchedulerOutput
    from jaxllm.runner.batch import pack_batch
    from jaxllm.runner.buckets import Bucket
    if so.num_decode_steps > 1:  # the runner packs the first decode step of each request
        so = SchedulerOutput([ScheduledRequest(sr.request, sr.num_computed_tokens, 1, sr.block_ids)
                              for sr in so.scheduled], len(so.scheduled))
    hb = pack_batch(so, Bucket(64, 8), 4, 24, 96, {rid: 0 for rid in prev_sampled})
    assert (hb.prev_rows >= 0).sum() <= len(prev_sampled)


def _sched_loop(seed: int, asynchronous: bool, multi_step: bool, policy: str = "fcfs"):
    from tests.core.helpers import make_request, make_scheduler
    rng = np.random.default_rng(seed)
    sched = make_scheduler(num_blocks=int(rng.integers(16, 32)), block_size=4, max_num_seqs=6,
                           max_num_batched_tokens=int(rng.integers(8, 40)), max_model_len=96, policy=policy)
    reqs = [make_request(f"r{i}", rng.integers(3, 99, int(rng.integers(1, 30))).tolist(),
                         max_tokens=int(rng.integers(1, 30)), priority=int(rng.integers(0, 3)))
            for i in range(10)]
    arrive = sorted(rng.integers(0, 15, len(reqs)).tolist())
    requests = {r.request_id: r for r in reqs}
    inflight, step, added = None, 0, 0
    while added < len(reqs) or sched.has_unfinished_requests() or inflight is not None:
        while added < len(reqs) and arrive[added] <= step:
            sched.add_request(reqs[added])
            added += 1
        if step == 6:  # unknown / finished ids are ignored
            sched.finish_requests("r4", RequestStatus.FINISHED_ABORTED)
        so = sched.schedule_decode_steps(4) if multi_step else None
        so = so or sched.schedule()
        sampled = dict(sched._sampled_by_step.get(id(so), {}))  # what the device would sample
        _check_packable(so, inflight[1] if inflight is not None else {})
        if asynchronous:
            if inflight is not None:
                sched.update_from_output(inflight[0], _fake_run(*inflight))
            inflight = None if so.is_empty else (so, sampled)
        elif not so.is_empty:
            sched.update_from_output(so, _fake_run(so, sampled))
        step += 1
        assert step < 2000
    kv = sched.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not sched._pending and not sched._sampled_by_step
    return {rid: (r.output_token_ids, r.get_finished_reason()) for rid, r in requests.items()}, sched


@pytest.mark.parametrize("multi_step,policy", [(False, "fcfs"), (True, "fcfs"), (False, "priority")])
def test_scheduler_async_order_same_outputs(multi_step, policy):
    preemptions = 0
    for seed in range(25):
        ref, _ = _sched_loop(seed, False, multi_step, policy)
        got, sched = _sched_loop(seed, True, multi_step, policy)
        preemptions += sched.num_preemptions
        for rid in ref:
            if rid == "r4":  # aborted at a step: both a prefix of the same sequence
                a, b = ref[rid][0], got[rid][0]
                assert a[:len(b)] == b or b[:len(a)] == a
                continue
            assert got[rid] == ref[rid], (seed, rid)
    assert preemptions > 0  # the small pools did preempt


def test_engine_runs_async_unless_told_not_to(engines, tiny_llama_dir):
    _, sync, asyn = engines
    assert sync.llm_engine.async_scheduling is False and asyn.llm_engine.async_scheduling is True
    default = LLM(tiny_llama_dir, dtype="float32", progress=False, max_model_len=64, max_num_seqs=2,
                  max_num_batched_tokens=8, num_kv_blocks=16, num_decode_steps=1)
    assert default.llm_engine.async_scheduling is True    # unset (None): on, as in vLLM
