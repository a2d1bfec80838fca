"""The contract between the scheduler (host policy) and the model runner (host → device).

Flow: ``Scheduler.schedule() -> SchedulerOutput -> ModelRunner.execute() -> ModelRunnerOutput
-> Scheduler.update_from_output()``. The scheduler decides *which tokens* of *which requests* run
this step; the runner only reads this object, packs those tokens into one flat ragged batch and
calls the jitted step. There is no prefill or decode phase here: a scheduled request is simply
``num_scheduled_tokens`` tokens starting at ``num_computed_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.request import Request


@dataclass
class ScheduledRequest:
    # The request itself (read-only for the runner): token ids come from request.all_token_ids.
    request: Request
    # KV already in the cache before this step: the chunk starts at this position.
    num_computed_tokens: int
    # Tokens to run this step (a whole prompt, a prefill chunk, or 1 for a decode).
    num_scheduled_tokens: int
    # The request's whole block table after this step's allocation (block ids into the KV pages).
    block_ids: list[int]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one.
        A partial prefill chunk computes KV only."""
        return self.num_computed_tokens + self.num_scheduled_tokens >= self.request.num_tokens


@dataclass
class SchedulerOutput:
    # Requests that run this step, in batch order (the order their tokens are packed in).
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Sum of num_scheduled_tokens: at most max_num_batched_tokens.
    total_num_scheduled_tokens: int = 0
    # Requests preempted in this call (their blocks were freed; they will recompute).
    preempted_req_ids: set[str] = field(default_factory=set)
    # Requests that finished or were aborted since the previous step (runner may drop their state).
    finished_req_ids: set[str] = field(default_factory=set)
    # > 1: a multi-step decode. Every scheduled request is a decode whose first input is its last
    # known token; the device samples and feeds back up to num_scheduled_tokens tokens per request
    # (at most num_decode_steps) and the host checks stops afterwards.
    num_decode_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    # For each scheduled request that sampled this step (ScheduledRequest.samples), its new token ids.
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # For requests that asked for logprobs: one dict token_id -> logprob per new token
    # (top-k plus the sampled token).
    logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    # For requests that asked for prompt_logprobs, filled on the step that computes the prompt.
    prompt_logprobs: dict[str, list[dict[int, float] | None]] = field(default_factory=dict)
