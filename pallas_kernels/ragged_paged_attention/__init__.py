"""Ragged paged attention: one entry point, several backends chosen by platform."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

BACKENDS = ("auto", "reference")


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "reference"
    return backend


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "backend", "interpret"))
def ragged_paged_attention(
    q: jax.Array,             # [T, num_q_heads, head_dim], tokens packed request by request
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: jax.Array,       # i32[S] context length of each sequence incl. this step's tokens
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,     # i32[S + 1]
    num_seqs: jax.Array,      # i32[1]; sequences past num_seqs are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Causal attention of each sequence's last q_len tokens over its paged KV context."""
    backend = _resolve_backend(backend)
    return ref_ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                      sm_scale=sm_scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
