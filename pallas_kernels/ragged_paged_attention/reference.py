"""Vectorized pure-jnp ragged paged attention: the ground truth and the CPU backend.

Same contract as ``jax.experimental.pallas.ops.tpu.ragged_paged_attention``: each sequence's
queries are its last ``q_len`` positions; query j of sequence i attends keys
``0 .. kv_len - q_len + j`` (and, with a sliding window, only the last ``sliding_window`` of them).

Vectorized over sequences: every token gathers its own sequence's pages (``[T, P*page_size]``
keys), so the cost is O(T * max_context) – fine for CPU tests and small batches, and the
reason the GPU/TPU kernels exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_to_seq(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """i32[T]: index of the sequence each flat token belongs to (padding tokens → a padded seq)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # searchsorted on the (non-decreasing) cumulative lengths: seq i owns [cu[i], cu[i+1]).
    return jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)


def ref_ragged_paged_attention(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: jax.Array,       # i32[S]
    page_indices: jax.Array,  # i32[S, P]
    cu_q_lens: jax.Array,     # i32[S + 1]
    num_seqs: jax.Array,      # i32[1]
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    mask_value: float = DEFAULT_MASK_VALUE,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    T, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    S, P = page_indices.shape
    max_kv = P * page_size

    seq = token_to_seq(cu_q_lens, T)                       # [T]
    seq_c = jnp.minimum(seq, S - 1)
    valid_tok = (seq < num_seqs[0]) & (seq < S)
    q_len = cu_q_lens[seq_c + 1] - cu_q_lens[seq_c]        # [T]
    kv_len = kv_lens[seq_c]                                # [T]
    # Absolute position of each query token in its sequence.
    q_pos = kv_len - q_len + (jnp.arange(T) - cu_q_lens[seq_c])

    # Gather each sequence's pages once: [S, max_kv, 2*Hkv, D].
    kv = kv_pages[page_indices].reshape(S, max_kv, num_combined, head_dim)
    k = kv[:, :, 0::2, :]
    v = kv[:, :, 1::2, :]
    if k_scale is not None:
        k = (k.astype(jnp.float32) * k_scale).astype(q.dtype)
    if v_scale is not None:
        v = (v.astype(jnp.float32) * v_scale).astype(q.dtype)
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)

    qg = q.reshape(T, num_kv_heads, group, head_dim)
    # scores[t, h, g, k] for token t against every key slot of its own sequence.
    k_tok = k[seq_c]                                       # [T, max_kv, Hkv, D]
    v_tok = v[seq_c]
    s = jnp.einsum("thgd,tkhd->thgk", qg, k_tok, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    k_pos = jnp.arange(max_kv)[None, :]                    # [1, max_kv]
    mask = (k_pos <= q_pos[:, None]) & (k_pos < kv_len[:, None])
    if sliding_window is not None:
        mask &= k_pos > q_pos[:, None] - sliding_window
    mask &= valid_tok[:, None]
    s = jnp.where(mask[:, None, None, :], s, mask_value)
    # Slots a query may not see (past kv_len, before the window, other sequences' pages) can hold
    # anything, NaN included: zero their V, since a probability of 0 times NaN is still NaN.
    v_tok = jnp.where(mask[:, :, None, None], v_tok, 0)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    p = jnp.where(mask[:, None, None, :], p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("thgk,tkhd->thgd", p.astype(v_tok.dtype), v_tok, preferred_element_type=jnp.float32)
    out = jnp.where(valid_tok[:, None, None, None], out, 0.0)
    return out.reshape(T, num_q_heads, head_dim).astype(q.dtype)
