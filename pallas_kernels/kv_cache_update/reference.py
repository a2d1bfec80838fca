"""Write this step's keys/values into their page slots: one scatter, in place under donation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_kv_cache(
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    k: jax.Array,             # [T, num_kv_heads, head_dim]
    v: jax.Array,             # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]  page * page_size + offset; -1 for padding tokens (dropped)
) -> jax.Array:               # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    """Returns ``kv_pages`` with token t's K/V written at slot ``slot_mapping[t]``.

    K of kv head h goes to combined index 2h and V to 2h+1; ``k``/``v`` are cast to the cache
    dtype; tokens with a negative slot are dropped. Slots must be unique (each is a fresh cache
    position), which lets XLA emit a plain scatter.

    In place: jitted with the cache donated (``jax.jit(f, donate_argnums=0)``, or the model step
    donating all layers' caches), XLA aliases the output to the input buffer
    (``input_output_alias`` in the compiled HLO, ``memory_analysis().alias_size_in_bytes`` equal
    to the cache size), emits no copy of the cache, and needs only O(T) temporary memory (a few KiB
    for the interleaved K/V rows). Without donation XLA must first copy the whole cache – see
    tests/kernels/test_kv_cache_update.py, which checks both on the compiled program.

    Raises:
      ValueError: (at trace time) for shapes that do not fit the cache layout.
    """
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2:
        raise ValueError("kv_pages: must be [num_pages, page_size, 2 * num_kv_heads, head_dim], "
                         f"got shape {kv_pages.shape}")
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    T = k.shape[0]
    want = (T, num_combined // 2, head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.shape != want:
            raise ValueError(f"{name}: must have shape [T, num_kv_heads, head_dim] = {want}, "
                             f"got {x.shape}")
    if slot_mapping.shape != (T,) or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping: must be an integer array of shape ({T},), got "
                         f"{slot_mapping.dtype}{list(slot_mapping.shape)}")
    # Interleave K and V on the combined-head axis: K of head h at 2h, V at 2h+1.
    kv = jnp.stack([k, v], axis=2).reshape(T, num_combined, head_dim).astype(kv_pages.dtype)
    total = num_pages * page_size
    # -1 would wrap around; map padding past the end so mode="drop" discards it.
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)
    flat = kv_pages.reshape(total, num_combined, head_dim)
    flat = flat.at[slots].set(kv, mode="drop", unique_indices=True)
    return flat.reshape(kv_pages.shape)
