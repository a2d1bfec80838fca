"""Write this step's keys/values into their page slots: one scatter, in place under donation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_kv_cache(
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    k: jax.Array,             # [T, num_kv_heads, head_dim]
    v: jax.Array,             # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]  page * page_size + offset; -1 for padding tokens (dropped)
) -> jax.Array:
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    T = k.shape[0]
    # Interleave K and V on the combined-head axis: K of head h at 2h, V at 2h+1.
    kv = jnp.stack([k, v], axis=2).reshape(T, num_combined, head_dim).astype(kv_pages.dtype)
    total = num_pages * page_size
    # -1 would wrap around; map padding past the end so mode="drop" discards it.
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)
    flat = kv_pages.reshape(total, num_combined, head_dim)
    flat = flat.at[slots].set(kv, mode="drop", unique_indices=True)
    return flat.reshape(kv_pages.shape)
