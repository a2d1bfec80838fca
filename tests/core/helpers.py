"""Small builders shared by the core tests (no jax anywhere)."""

from __future__ import annotations

import itertools

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams

EOS = 2
_arrivals = itertools.count()


def make_request(rid: str, prompt: list[int], *, max_tokens: int = 8, priority: int = 0,
                 arrival_time: float | None = None, eos: frozenset[int] = frozenset({EOS}),
                 **sp_kwargs) -> Request:
    # Default arrival order = creation order.
    arrival = float(next(_arrivals)) if arrival_time is None else arrival_time
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **sp_kwargs), max_tokens=max_tokens,
                   arrival_time=arrival, priority=priority, eos_token_ids=eos)


def make_scheduler(*, num_blocks: int = 64, block_size: int = 8, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 256, policy: str = "fcfs",
                   enable_prefix_caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                     policy=policy, max_model_len=max_model_len),
                     CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
                     num_blocks)


def fake_output(out: SchedulerOutput, token: int = 7, per_request: dict[str, list[int]] | None = None
                ) -> ModelRunnerOutput:
    """A model that samples ``token`` (or the given list) for every request that samples."""
    per_request = per_request or {}
    return ModelRunnerOutput(sampled_token_ids={
        sr.request_id: per_request.get(sr.request_id, [token]) for sr in out.scheduled if sr.samples})


def step(sched: Scheduler, token: int = 7, per_request: dict[str, list[int]] | None = None
         ) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    changed = sched.update_from_output(out, fake_output(out, token, per_request))
    return out, changed


def sched_tokens(out: SchedulerOutput) -> dict[str, int]:
    return {sr.request_id: sr.num_scheduled_tokens for sr in out.scheduled}
