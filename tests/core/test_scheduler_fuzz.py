"""Property-based fuzz of Scheduler + KVCacheManager + BlockPool (hypothesis state machine).

Random sequences of add (with n > 1 siblings and shared prefixes) / abort / stop-string finish /
step, under tiny pools so preemption and eviction happen often. A fake device memory checks what
the block tables mean: each step first writes every scheduled token's "KV" (the token sequence up
to it) to its slot, then every scheduled request reads its whole context back, which must be its
own tokens. So a wrong block table, a wrong prefix-cache hit or a block cached before its KV was
written fails here, not only the bookkeeping invariants checked after every operation.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxllm.core.hashing import ROOT_HASH, hash_block_tokens
from jaxllm.core.kv_cache_manager import cdiv
from jaxllm.core.scheduler_output import ModelRunnerOutput
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from tests.core.helpers import EOS, make_scheduler

BASE = [1, 3, 5, 7, 9, 4, 6, 8] * 6  # shared prefix material, so prefix hits are common
VOCAB = 10
MAX_LIVE = 10  # bounds the work left for teardown's drain


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["fcfs", "priority"]), caching=st.booleans(),
                num_blocks=st.integers(3, 20), budget=st.integers(4, 40), max_num_seqs=st.integers(1, 5),
                max_model_len=st.integers(12, 64))
    def setup(self, policy, caching, num_blocks, budget, max_num_seqs, max_model_len):
        self.bs = 8
        self.budget = budget
        self.sched = make_scheduler(num_blocks=num_blocks, block_size=self.bs, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=budget, max_model_len=max_model_len,
                                    policy=policy, enable_prefix_caching=caching)
        self.kv = self.sched.kv_cache_manager
        self.pool = self.kv.block_pool
        self.memory: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> tokens[:pos+1]
        self.next_id = 0
        self.clock = 0.0

    # ---- operations --------------------------------------------------------------------------
    # Each rule draws one seed and derives its choices from it: hypothesis draws cost ~1 ms each,
    # which would otherwise dominate the run time.
    @precondition(lambda self: len(self.sched.requests) < MAX_LIVE)
    @rule(seed=st.integers(0, 2**32 - 1))
    def add(self, seed):
        rng = random.Random(seed)
        prompt = BASE[:rng.randint(0, len(BASE))] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 10))]
        max_tokens = rng.randint(1, 12)
        n = rng.randint(1, 3)
        sp = SamplingParams(n=n, max_tokens=max_tokens, min_tokens=rng.randint(0, min(2, max_tokens)),
                            stop_token_ids=rng.sample(range(VOCAB), rng.randint(0, 1)),
                            ignore_eos=rng.random() < 0.3)
        priority = rng.randint(0, 3)
        self.clock += 1.0
        fits = (0 < len(prompt) and len(prompt) + max_tokens <= self.sched.max_model_len
                and cdiv(len(prompt) + max_tokens, self.bs) <= self.kv.num_total_blocks)
        for i in range(n):
            req = Request(f"r{self.next_id}#{i}", prompt, sp, max_tokens=max_tokens, arrival_time=self.clock,
                          priority=priority, eos_token_ids=frozenset({EOS}))
            try:
                self.sched.add_request(req)
                assert fits
            except ValueError:
                assert not fits
        self.next_id += 1

    @rule(seed=st.integers(0, 2**32 - 1))
    def abort(self, seed):
        """Abort, or finish as the detokenizer does on a stop string, 1-2 requests (maybe unknown)."""
        rng = random.Random(seed)
        chosen = rng.sample(sorted(self.sched.requests) + ["never-added"], 1 + (len(self.sched.requests) > 1))
        status = rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED])
        reqs = [self.sched.requests[i] for i in chosen if i in self.sched.requests]
        self.sched.finish_requests(chosen, status)
        assert all(r.status == status for r in reqs)
        assert not any(i in self.sched.requests for i in chosen)

    @rule(seed=st.integers(0, 2**32 - 1), num_steps=st.integers(1, 4), decode_steps=st.integers(1, 4))
    def step(self, seed, num_steps, decode_steps):
        rng = random.Random(seed)
        for _ in range(num_steps):
            self._step(lambda: rng.randrange(VOCAB), decode_steps)

    @rule(seed=st.integers(0, 9))
    def reset_prefix_cache(self, seed):
        if seed == 0:  # rarely: it wipes out the hits the other rules build up
            self.sched.reset_prefix_cache()
            assert not self.pool.cached

    def _step(self, draw_token, decode_steps=1):
        had_work = self.sched.has_unfinished_requests()
        out = None
        if decode_steps > 1 and hasattr(self.sched, "schedule_decode_steps"):
            out = self.sched.schedule_decode_steps(decode_steps)  # None: does not apply now
        multi = out is not None
        if out is None:
            out = self.sched.schedule()
        assert not had_work or out.scheduled, "scheduler made no progress"
        n_sched = [sr.num_scheduled_tokens for sr in out.scheduled]
        assert all(n >= 1 for n in n_sched) and out.total_num_scheduled_tokens == sum(n_sched)
        if not multi:
            assert out.total_num_scheduled_tokens <= self.budget
        assert len({sr.request_id for sr in out.scheduled}) == len(out.scheduled)
        assert len(self.sched.running) <= self.sched.max_num_seqs
        assert not out.preempted_req_ids & {sr.request_id for sr in out.scheduled}
        # The model's tokens, drawn up front: a multi-step decode feeds token k back as input k+1.
        sampled, context = {}, {}
        for sr in out.scheduled:
            c, n = sr.num_computed_tokens, sr.num_scheduled_tokens
            tokens = sr.request.all_token_ids
            if multi:
                assert c == len(tokens) - 1
                sampled[sr.request_id] = [draw_token() for _ in range(n)]
            elif sr.samples:
                sampled[sr.request_id] = [draw_token()]
            context[sr.request_id] = tokens + sampled.get(sr.request_id, [])[:-1]
            assert c + n <= len(context[sr.request_id]) and len(sr.block_ids) >= cdiv(c + n, self.bs)
            assert 0 not in sr.block_ids  # the null block is never handed out
        for sr in out.scheduled:  # 1. write this step's KV (all layers write before attention)
            ctx = context[sr.request_id]
            for pos in range(sr.num_computed_tokens, sr.num_computed_tokens + sr.num_scheduled_tokens):
                self.memory[(sr.block_ids[pos // self.bs], pos % self.bs)] = tuple(ctx[:pos + 1])
        for sr in out.scheduled:  # 2. attention reads the whole context back
            ctx = context[sr.request_id]
            for pos in range(sr.num_computed_tokens + sr.num_scheduled_tokens):
                got = self.memory.get((sr.block_ids[pos // self.bs], pos % self.bs))
                assert got == tuple(ctx[:pos + 1]), f"{sr.request_id} reads stale KV at {pos}"
        changed = self.sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
        assert {r.request_id for r in changed} == set(sampled)

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def bookkeeping(self):
        sched, kv, pool = self.sched, self.kv, self.pool
        live = sched.requests
        assert set(live) == {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}
        assert len(sched.running) <= sched.max_num_seqs
        assert set(kv.req_to_blocks) <= {r.request_id for r in sched.running}
        holders = [0] * pool.num_blocks
        for rid, blocks in kv.req_to_blocks.items():
            assert len({b.block_id for b in blocks}) == len(blocks)
            for b in blocks:
                holders[b.block_id] += 1
        for req in live.values():
            assert 0 <= req.num_computed_tokens <= req.num_tokens
            assert len(kv.get_block_ids(req)) >= cdiv(req.num_computed_tokens, self.bs)
            assert req.status in (RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.PREEMPTED)
        for b in pool.blocks[1:]:
            assert b.ref_cnt == holders[b.block_id], f"block {b.block_id}"
            assert (b in pool.free_queue) == (b.ref_cnt == 0)
        assert pool.null_block.ref_cnt == 0 and pool.null_block not in pool.free_queue
        held = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
        assert len(pool.free_queue) + held == kv.num_total_blocks == pool.num_blocks - 1
        assert all(b.ref_cnt == 0 for b in pool.free_queue)

    @invariant()
    def prefix_cache_is_valid(self):
        for h, b in self.pool.cached.items():
            assert b.block_hash == h
            # Its KV has been written and is exactly the prefix the hash names.
            content = self.memory.get((b.block_id, self.bs - 1))
            assert content is not None and len(content) % self.bs == 0
            parent = ROOT_HASH
            for i in range(0, len(content), self.bs):
                parent = hash_block_tokens(parent, content[i:i + self.bs])
            assert parent == h
            for j in range(self.bs):
                assert self.memory[(b.block_id, j)] == content[:len(content) - self.bs + j + 1]
        assert sum(1 for b in self.pool.blocks if b.block_hash is not None) == len(self.pool.cached)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # Everything still queued must finish on its own (no livelock), then the pool is empty.
        tokens = iter(range(10**6))
        for _ in range(3000):
            if not self.sched.has_unfinished_requests():
                break
            self._step(lambda: 3 + next(tokens) % 5)  # never EOS: runs to max_tokens
            self.bookkeeping()
            self.prefix_cache_is_valid()
        assert not self.sched.has_unfinished_requests()
        assert self.kv.num_free_blocks == self.kv.num_total_blocks and not self.kv.req_to_blocks
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)
        assert self.sched.stats()["num_requests_running"] == self.sched.stats()["num_requests_waiting"] == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSchedulerFuzz = SchedulerMachine.TestCase
