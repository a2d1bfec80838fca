"""Device-side batch metadata: the contract between the runner and the model.

Flow: ``SchedulerOutput`` (host, Python objects) → ``runner.batch`` packs numpy arrays padded to
buckets → ``AttentionMetadata`` (device pytree, below) → every attention layer.

T = padded number of scheduled tokens (token bucket), S = padded number of sequences (sequence
bucket), P = pages per sequence (max_model_len / page_size, static). Padded tokens have
``slot_mapping == -1`` (their KV is dropped) and belong to no sequence; padded sequences have
``kv_lens == 0`` and empty ``cu_q_lens`` ranges, and sit past ``num_seqs``.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass
class AttentionMetadata:
    input_positions: jax.Array  # i32[T]    position of each token in its sequence (padding: 0)
    slot_mapping: jax.Array     # i32[T]    KV slot = page * page_size + offset (padding: -1)
    kv_lens: jax.Array          # i32[S]    context length incl. this step's tokens (padding: 0)
    page_indices: jax.Array     # i32[S, P] page table per sequence (padding: 0)
    cu_q_lens: jax.Array        # i32[S+1]  token offsets of each sequence in the flat batch
    num_seqs: jax.Array         # i32[1]    number of real sequences


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=[f.name for f in dataclasses.fields(AttentionMetadata)],
    meta_fields=[],
)
