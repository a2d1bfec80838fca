"""Allocate the paged KV cache: one ``[num_pages, page_size, 2 * num_kv_heads, head_dim]`` array per layer.

Sizing: ``num_kv_blocks`` when given; otherwise from the device's free memory after the weights
(and the step's own temporaries) times ``gpu_memory_utilization``. The CPU backend reports no
memory limit, so there the cache is sized to hold ``max_num_seqs`` full-length sequences, capped
at ``CPU_KV_CACHE_BYTES``.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: jnp.dtype) -> int:
    return num_layers * block_size * 2 * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


def device_free_bytes(device: jax.Device, utilization: float) -> int | None:
    """Bytes of the device pool not yet in use (after the weights), or None where the backend
    reports no limit (CPU).

    ``utilization`` is applied where XLA's pool is sized: the engine sets
    XLA_PYTHON_CLIENT_MEM_FRACTION to gpu_memory_utilization before the backend starts, so
    ``bytes_limit`` already is that fraction of the card. 2% of it stays free for fragmentation.
    """
    del utilization
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    limit = stats["bytes_limit"]
    return max(0, int(limit * 0.98) - stats.get("bytes_in_use", 0))


def num_blocks_for(*, num_kv_blocks: int | None, per_block: int, device: jax.Device, utilization: float,
                   reserve_bytes: int, max_num_seqs: int, max_model_len: int, block_size: int,
                   divisor: int = 1) -> int:
    """Decide the number of KV blocks (per-device bytes; ``divisor`` = KV shards per block)."""
    if num_kv_blocks is not None:
        return num_kv_blocks
    free = device_free_bytes(device, utilization)
    per_block_dev = max(1, per_block // divisor)
    if free is None:
        wanted = max_num_seqs * math.ceil(max_model_len / block_size) + 1
        return max(2, min(wanted, CPU_KV_CACHE_BYTES // per_block_dev))
    n = (free - reserve_bytes) // per_block_dev
    if n < 2:
        raise ValueError(
            f"gpu_memory_utilization: no room for the KV cache ({free / 2**30:.2f} GiB free after the "
            f"weights, {reserve_bytes / 2**30:.2f} GiB needed for activations); raise "
            f"gpu_memory_utilization, lower max_num_batched_tokens, or use a larger device")
    return int(n)


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: jnp.dtype, sharding=None) -> list[jax.Array]:
    shape = (num_blocks, block_size, 2 * num_kv_heads, head_dim)

    def zeros():
        return jnp.zeros(shape, dtype)

    make = jax.jit(zeros, out_shardings=sharding) if sharding is not None else jax.jit(zeros)
    return [make() for _ in range(num_layers)]
