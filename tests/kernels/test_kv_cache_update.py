"""update_kv_cache: writes the right slots, drops padding, and runs in place under donation."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import update_kv_cache

NUM_PAGES, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, T = 64, 16, 2, 64, 8
CACHE_SHAPE = (NUM_PAGES, PAGE_SIZE, 2 * NUM_KV_HEADS, HEAD_DIM)


@pytest.fixture(scope="module")
def step():
    """Random cache, this step's K/V, and slots (two padding tokens with slot -1)."""
    rng = np.random.default_rng(0)
    cache = rng.standard_normal(CACHE_SHAPE).astype(np.float32)
    k = rng.standard_normal((T, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((T, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    slots = rng.choice(NUM_PAGES * PAGE_SIZE, size=T, replace=False).astype(np.int32)
    slots[-2:] = -1
    return cache, k, v, slots


def _args(step):
    cache, k, v, slots = step
    return jnp.asarray(cache), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_writes_each_token_to_its_slot(step, dtype):
    cache, k, v, slots = step
    kv, kj, vj, sj = _args(step)
    out = np.asarray(update_kv_cache(kv.astype(dtype), kj, vj, sj).astype(jnp.float32))
    want = np.array(jnp.asarray(cache).astype(dtype).astype(jnp.float32))
    k_c = np.asarray(jnp.asarray(k).astype(dtype).astype(jnp.float32))
    v_c = np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32))
    for t, slot in enumerate(slots):
        if slot < 0:
            continue  # padding: dropped, also not wrapped around to the last slot
        page, off = divmod(int(slot), PAGE_SIZE)
        want[page, off, 0::2] = k_c[t]   # K of head h at 2h
        want[page, off, 1::2] = v_c[t]   # V of head h at 2h+1
    np.testing.assert_array_equal(out, want)


def test_invalid_shapes_name_the_argument(step):
    kv, k, v, s = _args(step)
    with pytest.raises(ValueError, match="k:"):
        update_kv_cache(kv, k[:, :1], v, s)
    with pytest.raises(ValueError, match="slot_mapping:"):
        update_kv_cache(kv, k, v, s[:-1])
    with pytest.raises(ValueError, match="kv_pages:"):
        update_kv_cache(kv[..., :3, :], k, v, s)


def _compile(step, donate: bool):
    args = _args(step)
    fn = jax.jit(update_kv_cache, donate_argnums=(0,) if donate else ())
    return fn.lower(*args).compile()


def _full_cache_copies(hlo: str) -> int:
    """Number of HLO copy ops producing a whole cache-sized array."""
    dims = ",".join(map(str, CACHE_SHAPE))
    return len(re.findall(rf"= f32\[{dims}\]\{{[^}}]*\}} copy\(", hlo))


def test_in_place_under_donation(step):
    cache_bytes = int(np.prod(CACHE_SHAPE)) * 4
    donated = _compile(step, donate=True)
    hlo, mem = donated.as_text(), donated.memory_analysis()
    assert re.search(r"input_output_alias=\{\s*\{\}:\s*\(0,", hlo), "output not aliased to the cache"
    assert mem.alias_size_in_bytes == cache_bytes
    assert _full_cache_copies(hlo) == 0
    assert mem.temp_size_in_bytes < cache_bytes // 16   # only the step's K/V rows

    # Contrast: without donation XLA copies the whole cache first, so the checks above can fail.
    copied = _compile(step, donate=False)
    assert copied.memory_analysis().alias_size_in_bytes == 0
    assert _full_cache_copies(copied.as_text()) == 1


def test_donated_buffer_is_consumed(step):
    kv, k, v, s = _args(step)
    out = jax.jit(update_kv_cache, donate_argnums=0)(kv, k, v, s)
    assert kv.is_deleted() and not out.is_deleted()
