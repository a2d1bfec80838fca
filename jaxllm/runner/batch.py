"""Pack a SchedulerOutput into the padded arrays of one step (host side, numpy only).

Flow: ``SchedulerOutput`` (Python objects) → ``pack_batch`` → ``HostBatch`` (numpy, padded to a
``Bucket``) → ``HostBatch.to_device`` → ``(input_ids, AttentionMetadata, logits_indices,
SamplingMetadata)`` device pytrees → the jitted step.

Token i of the flat batch belongs to sequence ``s`` with ``cu_q_lens[s] <= i < cu_q_lens[s+1]``;
padding tokens come after the last real one, write their KV to slot -1 (dropped) and belong to
no sequence. Padding sequences have kv_len 0 and an empty token range.

Asynchronous scheduling: a chunk may end in a token the previous (still running) step samples.
Its ``input_ids`` entry is 0 and ``prev_rows`` names the row of the previous step's on-device
``next_tokens`` that holds it; the jitted step gathers it there (``prev_rows == -1``: known token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.core.scheduler_output import SchedulerOutput
from jaxllm.runner.buckets import Bucket

# Banned-token slots per row (EOS + stop_token_ids while below min_tokens).
MAX_BANNED = 32


@dataclass
class HostBatch:
    bucket: Bucket
    num_tokens: int              # real tokens
    num_seqs: int                # real sequences
    input_ids: np.ndarray        # i32[T]
    positions: np.ndarray        # i32[T]
    slot_mapping: np.ndarray     # i32[T]   -1 for padding
    kv_lens: np.ndarray          # i32[S]
    page_indices: np.ndarray     # i32[S, P]
    cu_q_lens: np.ndarray        # i32[S+1]
    logits_indices: np.ndarray   # i32[S]   last scheduled token of each sequence
    # Sampling rows (S): see jaxllm.layers.sampler.SamplingMetadata.
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray
    repetition_penalty: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    prompt_lens: np.ndarray
    banned_ids: np.ndarray       # i32[S, MAX_BANNED]
    hist_ids: np.ndarray | None  # i32[S, H] only when a row uses penalties
    any_top_k_top_p: bool
    any_logprobs: bool
    prev_rows: np.ndarray        # i32[T]   row of the previous step's next_tokens, -1: input_ids holds it


def pack_batch(so: SchedulerOutput, bucket: Bucket, block_size: int, pages_per_seq: int,
               hist_len: int, prev_rows: dict[str, int] | None = None) -> HostBatch:
    """Pack ``so`` into arrays padded to ``bucket``.

    Args:
      prev_rows: request_id -> its row in the previous step's ``next_tokens``, for requests whose
        chunk ends in the token that step samples (async scheduling). Such a chunk must have that
        token, and no other unknown one, as its last.
    """
    T, S = bucket.num_tokens, bucket.num_seqs
    n_seqs = len(so.scheduled)
    input_ids = np.zeros(T, np.int32)
    prev = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.full(T, -1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    page_indices = np.zeros((S, pages_per_seq), np.int32)
    cu_q_lens = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)

    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    steps = np.zeros(S, np.int32)
    prompt_lens = np.zeros(S, np.int32)
    banned = np.full((S, MAX_BANNED), -1, np.int32)
    hist_ids = None
    any_tkp = False
    any_lp = False

    offset = 0
    for i, sr in enumerate(so.scheduled):
        req = sr.request
        start, n = sr.num_computed_tokens, sr.num_scheduled_tokens
        end = start + n
        known = req.num_tokens
        if end <= known:
            input_ids[offset:offset + n] = req.all_token_ids[start:end]
        else:  # the last token is in flight: the device takes it from the previous step
            row = (prev_rows or {}).get(req.request_id)
            if n != 1 or row is None:
                raise RuntimeError(f"{req.request_id}: chunk [{start}, {end}) needs tokens past the "
                                   f"{known} known ones that the previous step does not provide")
            prev[offset] = row
        pos = np.arange(start, end, dtype=np.int32)
        positions[offset:offset + n] = pos
        blocks = np.asarray(sr.block_ids, np.int32)
        slot_mapping[offset:offset + n] = blocks[pos // block_size] * block_size + pos % block_size
        nb = len(sr.block_ids)
        page_indices[i, :nb] = blocks
        kv_lens[i] = end
        offset += n
        cu_q_lens[i + 1] = offset
        logits_indices[i] = offset - 1

        sp = req.sampling_params
        temperature[i] = sp.temperature
        top_k[i] = sp.top_k
        top_p[i] = sp.top_p
        min_p[i] = sp.min_p
        presence[i] = sp.presence_penalty
        frequency[i] = sp.frequency_penalty
        repetition[i] = sp.repetition_penalty
        seeds[i] = req.seed & 0xFFFFFFFF
        # Output index of the token this chunk samples (known + in-flight outputs before it).
        num_out = max(0, end - req.num_prompt_tokens)
        steps[i] = num_out
        prompt_lens[i] = req.num_prompt_tokens
        any_tkp |= sp.top_k > 0 or sp.top_p < 1.0
        any_lp |= sp.logprobs is not None
        if num_out < sp.min_tokens:
            ban = sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(req.eos_token_ids)))
            banned[i, :len(ban)] = ban[:MAX_BANNED]
        if sp.uses_penalties and sr.samples:
            if end > known:
                raise RuntimeError(f"{req.request_id}: penalties need the whole history, but a token "
                                   f"is in flight (the engine must not overlap this step)")
            if hist_ids is None:
                hist_ids = np.full((S, hist_len), -1, np.int32)
            toks = req.all_token_ids[:hist_len]
            hist_ids[i, :len(toks)] = toks
    cu_q_lens[n_seqs + 1:] = offset
    return HostBatch(bucket, offset, n_seqs, input_ids, positions, slot_mapping, kv_lens, page_indices,
                     cu_q_lens, logits_indices, temperature, top_k, top_p, min_p, presence, frequency,
                     repetition, seeds, steps, prompt_lens, banned, hist_ids, any_tkp, any_lp, prev)
