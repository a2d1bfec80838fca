"""Token-budget continuous batching: which tokens of which requests run in the next step.

There is no prefill phase and no decode phase. Each request has ``num_computed_tokens`` (KV in the
cache) and ``num_tokens`` (prompt + generated); each step gives it up to the difference out of the
step's token budget. A whole prompt, a prefill chunk, a prefix-cache hit and a decode are all the
same thing. Order within a step:

1. RUNNING requests, oldest first. When the pool has no block left for one, the scheduler preempts
   (recompute): fcfs takes the last running request, priority the worst one (largest priority value,
   then latest arrival); its blocks are freed and it goes back to the front of the waiting queue.
2. WAITING requests (only if nobody was preempted this step, to avoid thrashing), after a
   prefix-cache lookup, while the budget, ``max_num_seqs`` and the free blocks allow.

Bookkeeping convention (as vLLM): ``num_computed_tokens`` advances when a step is *scheduled*, at
the end of ``schedule()``; ``ScheduledRequest.num_computed_tokens`` keeps the value before the step.
``update_from_output`` appends sampled tokens and checks stops (and, if the runner returned fewer
tokens than scheduled, pulls ``num_computed_tokens`` back to ``num_tokens - 1``). Call
``finish_requests`` between steps (after ``update_from_output``), never while a step is running.

Asynchronous scheduling (``SchedulerConfig.async_scheduling``; the engine drives it): the engine
may call ``schedule()`` for step t+1 *before* ``update_from_output`` of step t. A token that step t
will sample is then *in flight*: ``num_pending_tokens(request)`` counts it, the request's target
is ``num_tokens + pending`` so step t+1 may already schedule its decode (the runner feeds the
in-flight token from the device), and no step is scheduled past ``max_tokens``. When step t's
tokens arrive, ``update_from_output`` appends them and lowers the pending count. A request that
finishes at step t may have one more step in flight: its tokens are dropped (it is finished).
Freeing blocks while a step is in flight is safe because the device runs steps in order: a later
step that reuses a freed block writes it after the in-flight step is done with it. With at most
one step in flight (the engine's rule) a scheduled chunk has at most one unknown token, its last.
"""

from __future__ import annotations

import time
from typing import Iterable

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.core.kv_cache_manager import KVCacheManager, cdiv
from jaxllm.core.request_queue import create_request_queue
from jaxllm.core.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from jaxllm.request import Request, RequestStatus


class Scheduler:
    """Host-side scheduler. ``num_blocks`` counts the device's KV pages (block 0 is reserved)."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int):
        if scheduler_config.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1 (resolve it with EngineConfig.finalize), "
                             f"got {scheduler_config.max_model_len}")
        if not scheduler_config.max_num_batched_tokens:
            raise ValueError("max_num_batched_tokens: must be >= 1 (resolve it with EngineConfig.finalize), "
                             f"got {scheduler_config.max_num_batched_tokens}")
        if not scheduler_config.max_num_seqs:
            raise ValueError("max_num_seqs: must be >= 1 (resolve it with EngineConfig.finalize), "
                             f"got {scheduler_config.max_num_seqs}")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.policy = scheduler_config.policy
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        self.running: list[Request] = []
        # Ids finished since the last schedule(); reported in the next SchedulerOutput.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # request_id -> tokens that scheduled, not yet returned steps will sample (async scheduling).
        self._pending: dict[str, int] = {}
        # id(SchedulerOutput) -> {request_id: tokens that step samples}: lowers _pending on its return.
        self._sampled_by_step: dict[int, dict[str, int]] = {}

    def num_pending_tokens(self, request: Request) -> int:
        """Tokens of ``request`` sampled by steps in flight (0 unless scheduling asynchronously)."""
        return self._pending.get(request.request_id, 0)

    def _may_generate(self, request: Request) -> int:
        """How many more tokens the request may sample beyond the known and in-flight ones."""
        pending = self._pending.get(request.request_id, 0)
        return min(request.max_tokens - request.num_output_tokens - pending,
                   self.max_model_len - request.num_tokens - pending)

    # ---- admission ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError if it could never run."""
        n_prompt = request.num_prompt_tokens
        if n_prompt == 0:
            raise ValueError("prompt: must contain at least 1 token, got an empty prompt")
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {request.max_tokens}")
        total = n_prompt + request.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt length ({n_prompt}) + max_tokens ({request.max_tokens}) = {total} "
                             f"exceeds max_model_len ({self.max_model_len}); shorten the prompt or "
                             f"lower max_tokens to at most {self.max_model_len - n_prompt}")
        if not self.kv_cache_manager.can_fit(total):
            raise ValueError(f"prompt length ({n_prompt}) + max_tokens ({request.max_tokens}) = {total} "
                             f"tokens needs {cdiv(total, self.block_size)} KV blocks, but the cache has "
                             f"only {self.kv_cache_manager.num_total_blocks} blocks of {self.block_size}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    # ---- scheduling --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: set[str] = set()
        kv = self.kv_cache_manager

        # 1. Running requests: continue their prefill chunks and decodes.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = self._pending.get(request.request_id, 0)
            num_new = min(request.num_tokens + pending - request.num_computed_tokens, budget,
                          self.max_model_len - request.num_computed_tokens)
            if pending and self._may_generate(request) <= 0:
                num_new = 0  # its in-flight token is its last: nothing more to compute
            if num_new <= 0:
                i += 1
                continue
            while kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                victim_index = self.running.index(victim)
                self.running.pop(victim_index)
                if victim.request_id in scheduled:  # priority may pick one scheduled this step
                    budget += scheduled.pop(victim.request_id).num_scheduled_tokens
                if victim_index < i:
                    i -= 1
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = ScheduledRequest(
                    request, request.num_computed_tokens, num_new, kv.get_block_ids(request))
                budget -= num_new
                i += 1

        # 2. Waiting requests, if nobody had to make room this step.
        if not preempted:
            while len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting.peek()
                hit_blocks, num_hit = kv.get_computed_blocks(request)
                num_new = min(request.num_tokens - num_hit, budget)
                if kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                    break  # head-of-line: later requests wait too (keeps fcfs / priority order)
                self.waiting.pop()
                request.num_computed_tokens = num_hit
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_hit
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = time.monotonic()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                scheduled[request.request_id] = ScheduledRequest(
                    request, num_hit, num_new, kv.get_block_ids(request))
                budget -= num_new

        # The step's tokens count as computed from now on (see the module docstring).
        sampled = {sr.request_id: n for sr in scheduled.values() if (n := self._advance(sr, 1))}
        out = SchedulerOutput(
            scheduled=list(scheduled.values()),
            total_num_scheduled_tokens=sum(sr.num_scheduled_tokens for sr in scheduled.values()),
            preempted_req_ids=preempted,
            finished_req_ids=self.finished_req_ids,
        )
        self.finished_req_ids = set()
        self._record_sampled(out, sampled)
        return out

    def schedule_decode_steps(self, num_steps: int) -> SchedulerOutput | None:
        """Schedule up to ``num_steps`` decode tokens for every running request in one step.

        Only when nothing is waiting and every running request is decoding (its KV holds all but
        its last token). Each request gets ``min(num_steps, tokens it may still generate)`` slots;
        returns None (and changes nothing) when that does not apply or the blocks do not fit, and
        the caller falls back to ``schedule()``.
        """
        if len(self.waiting) or not self.running:
            return None
        reqs: list[Request] = []
        steps: list[int] = []
        for r in self.running:
            pending = self._pending.get(r.request_id, 0)
            if r.num_computed_tokens != r.num_tokens + pending - 1:
                return None
            room = self._may_generate(r)
            if pending and room <= 0:
                continue  # its in-flight tokens are its last
            reqs.append(r)
            steps.append(max(1, min(num_steps, room,
                                    self.max_model_len - r.num_computed_tokens)))
        if not steps or max(steps) < 2:
            return None
        kv = self.kv_cache_manager
        needed = sum(max(0, cdiv(r.num_computed_tokens + n, self.block_size) - len(kv.get_block_ids(r)))
                     for r, n in zip(reqs, steps))
        if needed > kv.num_free_blocks:
            return None
        scheduled, sampled = [], {}
        for r, n in zip(reqs, steps):
            if kv.allocate_slots(r, n) is None:  # cannot happen after the check above
                raise RuntimeError(f"KV allocation failed for {r.request_id} after the free-block check")
            scheduled.append(ScheduledRequest(r, r.num_computed_tokens, n, kv.get_block_ids(r)))
            sampled[r.request_id] = self._advance(scheduled[-1], num_steps)
        out = SchedulerOutput(scheduled=scheduled, total_num_scheduled_tokens=sum(steps),
                              finished_req_ids=self.finished_req_ids, num_decode_steps=num_steps)
        self.finished_req_ids = set()
        self._record_sampled(out, sampled)
        return out

    def _advance(self, sr: ScheduledRequest, num_decode_steps: int) -> int:
        """Count a scheduled chunk as computed and its sampled tokens as pending until they arrive."""
        request = sr.request
        rid = request.request_id
        pending = self._pending.get(rid, 0)
        if num_decode_steps > 1:
            n = sr.num_scheduled_tokens
        else:  # a chunk samples when it reaches the last (known or in-flight) token
            n = int(sr.num_computed_tokens + sr.num_scheduled_tokens >= request.num_tokens + pending)
        request.num_computed_tokens += sr.num_scheduled_tokens
        if n:
            self._pending[rid] = pending + n
        return n

    def _record_sampled(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        if sampled:
            self._sampled_by_step[id(out)] = sampled

    def _pick_victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)  # before the reset: see KVCacheManager.free
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    # ---- results -----------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, check stops, retire finished requests.

        Returns the requests that got new tokens or finished, in batch order. When several tokens
        arrive for one request and a stop hits, the tokens after the stop are dropped.
        """
        changed: list[Request] = []
        finished: list[Request] = []
        now = time.monotonic()
        sampled = self._sampled_by_step.pop(id(scheduler_output), {})
        for sr in scheduler_output.scheduled:
            request = sr.request
            rid = request.request_id
            if request.is_finished() or rid not in self.requests:
                continue  # finished since the step was scheduled (abort, or a stop in the step before)
            pending = self._pending.pop(rid, 0) - sampled.get(rid, 0)
            if pending > 0:
                self._pending[rid] = pending
            queued = request.status != RequestStatus.RUNNING  # preempted while this step ran (async)
            new_tokens = model_runner_output.sampled_token_ids.get(rid) or []
            for token in new_tokens:
                request.append_output_token_ids([token])
                if self._check_stop(request, token):
                    finished.append(request)
                    if queued:
                        self.waiting.remove(request)
                    break
            # The newest token never has KV yet. If the runner returned fewer tokens than the step
            # scheduled (none at all, or a multi-step decode cut short), recompute from there
            # instead of leaving a request with nothing left to schedule. Tokens of a step still
            # in flight (async scheduling) count as known here.
            limit = request.num_tokens + max(pending, 0) - 1
            if request.num_computed_tokens > limit:
                request.num_computed_tokens = limit
            if not new_tokens:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            changed.append(request)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
            for request in finished:
                self._retire(request)
        return changed

    def _check_stop(self, request: Request, token: int) -> bool:
        """Stop tokens first (so an EOS on the last allowed token reports "stop"), then length."""
        sp = request.sampling_params
        if request.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and token in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None  # EOS: as vLLM, stop_reason stays None
                return True
            if token in sp.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return True
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def _retire(self, request: Request) -> None:
        self._pending.pop(request.request_id, None)
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish waiting or running requests from outside (abort, stop string). Unknown ids
        (already finished, never added) are ignored."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"status: must be a FINISHED_* status, got {status!r}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._retire(request)

    # ---- introspection -----------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> None:
        self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> dict[str, int]:
        kv = self.kv_cache_manager
        return {
            "kv_blocks_total": kv.num_total_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "num_preemptions": self.num_preemptions,
            "num_requests_running": len(self.running),
            "num_requests_waiting": len(self.waiting),
        }
