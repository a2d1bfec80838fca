"""Request: one sequence's state as the engine, scheduler and runner see it (host only)."""

from __future__ import annotations

import enum
import time

from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after here is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop",
                RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(status)


class Request:
    """A single sequence. ``n > 1`` requests are fanned out by the engine into n of these."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 *, max_tokens: int, arrival_time: float | None = None, priority: int = 0,
                 eos_token_ids: frozenset[int] = frozenset(), seed: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # resolved: never None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.eos_token_ids = eos_token_ids
        # Sampling seed: SamplingParams.seed, or one the engine drew for an unseeded request. The
        # draw for the k-th output token depends only on (seed, k), whatever else is in the batch.
        self.seed = seed
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        # Tokens whose KV is in the cache (or will be once the scheduled step runs).
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache when first scheduled (-1: not yet scheduled).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Chained hashes of the full blocks of all_token_ids (filled by the KV cache manager).
        self.block_hashes: list[int] = []
        # Timestamps for metrics (monotonic seconds).
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __lt__(self, other: "Request") -> bool:  # priority queue order: (priority, arrival, id)
        return (self.priority, self.arrival_time, self.request_id) < (
            other.priority, other.arrival_time, other.request_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
