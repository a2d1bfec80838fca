"""Host-side (XLA) helpers shared by the GPU ragged paged attention kernels.

The GPU kernels launch a static grid of *query blocks*: each block holds up to ``block_q``
consecutive query tokens of ONE sequence, for one kv head (all ``group`` q heads of that kv head
together, so each KV page is read once per block). The mapping block -> (sequence, first token)
depends on the runtime ``cu_q_lens`` / ``num_seqs``, so it is computed here with a few tiny XLA
ops and handed to the kernel as two i32 arrays; blocks past the last real one get sequence -1
and exit at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_q_blocks(num_tokens: int, max_num_seqs: int, block_q: int) -> int:
    """Static upper bound on sum_i cdiv(q_len_i, block_q) given sum_i q_len_i <= num_tokens."""
    # Each sequence adds at most block_q - 1 padding slots; each block holds >= 1 token.
    return max(1, min(num_tokens, (num_tokens + max_num_seqs * (block_q - 1)) // block_q))


def q_block_table(
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,   # i32[1]
    num_blocks: int,
    block_q: int,
) -> tuple[jax.Array, jax.Array]:
    """Returns (blk_seq i32[NB], blk_q0 i32[NB]): each block's sequence (-1: none) and first
    query token offset inside that sequence."""
    s = cu_q_lens.shape[0] - 1
    idx = jnp.arange(s, dtype=jnp.int32)
    q_lens = jnp.where(idx < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S]
    q_lens = jnp.maximum(q_lens, 0)
    nblk = (q_lens + block_q - 1) // block_q                                   # [S]
    cum = jnp.cumsum(nblk)                                                     # [S]
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.searchsorted(cum, b, side="right").astype(jnp.int32)             # [NB]
    seq_c = jnp.minimum(seq, s - 1)
    first_blk = cum[seq_c] - nblk[seq_c]
    blk_q0 = (b - first_blk) * block_q
    blk_seq = jnp.where(b < cum[-1], seq_c, -1)
    return blk_seq.astype(jnp.int32), blk_q0.astype(jnp.int32)


def valid_token_mask(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> jax.Array:
    """bool[T]: tokens that belong to one of the first num_seqs sequences."""
    n = jnp.clip(num_seqs[0], 0, cu_q_lens.shape[0] - 1)
    return jnp.arange(num_tokens) < cu_q_lens[n]


def combine_splits(
    acc: jax.Array,  # f32[NS, T, Hq, D]  unnormalized partial outputs
    m: jax.Array,    # f32[NS, T, Hq]     running max (natural-log units)
    l: jax.Array,    # f32[NS, T, Hq]     partial sums of exp(s - m)
) -> jax.Array:      # f32[T, Hq, D]
    """Flash-decoding combine: merges per-split softmax partials into one normalized output."""
    m_max = jnp.max(m, axis=0)                                     # [T, Hq]
    m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe[None]), 0.0)  # [NS, T, Hq]
    l_tot = jnp.sum(w * l, axis=0)                                 # [T, Hq]
    out = jnp.einsum("sth,sthd->thd", w, acc)
    return out / jnp.where(l_tot == 0, 1.0, l_tot)[..., None]


def check_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sliding_window,
                 soft_cap) -> None:
    """Raises ValueError naming the offending argument when shapes do not fit the contract."""
    if q.ndim != 3:
        raise ValueError(f"q: must be [T, num_q_heads, head_dim], got shape {q.shape}")
    if kv_pages.ndim != 4:
        raise ValueError(f"kv_pages: must be [num_pages, page_size, 2*num_kv_heads, head_dim], "
                         f"got shape {kv_pages.shape}")
    t, hq, d = q.shape
    _, _, hc, dk = kv_pages.shape
    if dk != d:
        raise ValueError(f"kv_pages: head_dim must equal q's ({d}), got {dk}")
    if hc % 2 or hc == 0:
        raise ValueError(f"kv_pages: axis 2 must be 2*num_kv_heads (even, > 0), got {hc}")
    if hq % (hc // 2):
        raise ValueError(f"q: num_q_heads ({hq}) must be a multiple of num_kv_heads ({hc // 2})")
    if d < 16 or d & (d - 1):
        raise ValueError(f"q: head_dim must be a power of two >= 16, got {d}")
    if page_indices.ndim != 2:
        raise ValueError("page_indices: must be [max_num_seqs, pages_per_seq], "
                         f"got {page_indices.shape}")
    s = page_indices.shape[0]
    if kv_lens.shape != (s,):
        raise ValueError(f"kv_lens: must have shape ({s},), got {kv_lens.shape}")
    if cu_q_lens.shape != (s + 1,):
        raise ValueError(f"cu_q_lens: must have shape ({s + 1},), got {cu_q_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs: must have shape (1,), got {num_seqs.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: must be >= 1 or None, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap: must be > 0 or None, got {soft_cap}")
