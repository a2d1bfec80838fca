"""Mosaic TPU backend: our own Pallas TPU kernel for ragged paged attention.

Why not JAX's shipped ``jax.experimental.pallas.ops.tpu.ragged_paged_attention``: with jax 0.10.2
it does not run in TPU interpret mode (its ``ref.reshape`` → ``ReshapeTransform`` is unsupported by
the interpreter), so CPU CI could not cover it; with a sliding window it still reads every page
before the window and masks scores by adding ``mask_value`` (NaN there – e.g. pages freed once
outside the window – leaks into the result); and it rejects head counts that are not "XLA fully
tiled" (e.g. one kv head with an int8/fp8 cache). This kernel follows the same
plan (scalar-prefetched metadata, K/V pages DMA'd from HBM into a double-buffered VMEM scratch,
online softmax) with these differences:

* grid = (num_q_blocks,): each step owns ``bq`` consecutive flat tokens and all heads, and walks
  the sequences overlapping its block (first one precomputed outside the kernel by a
  searchsorted, so no cross-step state and the grid axis is "parallel").
* only pages that hold keys some row of the block can see are fetched: pages past the last
  visible key and, with a sliding window, pages before the window are never read.
* K/V columns outside ``[kv_lo, kv_hi)`` are zeroed with ``where`` and scores are masked with
  ``where`` (not ``+ mask_value``), so NaN/inf garbage in unowned memory cannot reach the output.
* rows of padding tokens come out as zeros.

Validated in TPU interpret mode on CPU (``interpret=True`` → ``pltpu.InterpretParams()``, which
also fills uninitialized VMEM with NaN) against ``reference.py`` and JAX's
``ref_ragged_paged_attention``, and its Pallas → Mosaic lowering is checked on CPU (faking a v5e);
it has NOT been compiled or timed on a real TPU (Mosaic's own layout passes run only there: the
per-head strided K/V loads ``kv_buf[slot, :, :, 2h, :]`` are the likeliest thing to need the
bitcast tricks of JAX's kernel for packed dtypes). Block sizes are conservative defaults, not
tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_INTERPRET_MODE = pltpu.InterpretParams
_LANES = 128  # m/l scratch is lane-broadcast, as TPU vregs are [8, 128]


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,       # i32[S]
    page_indices_ref,  # i32[S, P]
    cu_q_lens_ref,     # i32[S + 1]
    first_seq_ref,     # i32[num_q_blocks]  first sequence overlapping each q block
    num_seqs_ref,      # i32[1]
    # Inputs.
    q_ref,             # [bq, Hq, D]  (VMEM block)
    kv_hbm_ref,        # [num_pages, page_size, 2 * Hkv, D]  (HBM, fetched by DMA)
    # Output.
    o_ref,             # [bq, Hq, D]
    # Scratch.
    kv_buf,            # [2, pages_per_blk, page_size, 2 * Hkv, D]
    sems,              # DMA semaphores [2]
    m_ref,             # f32[Hkv, bq * G, 128]  running max
    l_ref,             # f32[Hkv, bq * G, 128]  running denominator
    acc_ref,           # f32[Hkv, bq * G, D]    running numerator
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    k_scale: float | None,
    v_scale: float | None,
):
    bq, num_q_heads, head_dim = q_ref.shape
    _, pages_per_blk, page_size, num_combined, _ = kv_buf.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    kv_per_blk = pages_per_blk * page_size
    q_blk = pl.program_id(0)
    blk_start = q_blk * bq
    blk_end = blk_start + bq
    num_seqs = num_seqs_ref[0]

    q_all = q_ref[...]                                                           # [bq, Hq, D]
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # Flat token index of each folded row (row r of head-group h is token r // G of the block).
    row_tok = blk_start + lax.broadcasted_iota(jnp.int32, (bq * group, kv_per_blk), 0) // group
    col_off = lax.broadcasted_iota(jnp.int32, (bq * group, kv_per_blk), 1)
    kv_col_off = lax.broadcasted_iota(jnp.int32, (kv_per_blk, 1), 0)

    def seq_body(seq):
        q_start = cu_q_lens_ref[seq]
        q_end = cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        r0 = jnp.maximum(q_start, blk_start)        # first flat token of this seq in the block
        r1 = jnp.minimum(q_end, blk_end)            # one past the last
        shift = kv_len - q_end                      # key position of token t is t + shift
        kv_hi = r1 + shift                          # one past the last visible key
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(r0 + shift - sliding_window + 1, 0)
        page_lo = kv_lo // page_size
        page_hi = pl.cdiv(kv_hi, page_size)         # pages [page_lo, page_hi) are read
        blk_lo = page_lo // pages_per_blk
        blk_hi = pl.cdiv(page_hi, pages_per_blk)

        def page_copy(kv_blk, slot, i):
            """(fetch?, DMA of the i-th page of KV block kv_blk into buffer slot)."""
            page = kv_blk * pages_per_blk + i
            fetch = (page >= page_lo) & (page < page_hi)
            # Clamp so the descriptor is always built from an in-range page-table entry.
            idx = page_indices_ref[seq, jnp.clip(page, page_lo, page_hi - 1)]
            return fetch, pltpu.make_async_copy(kv_hbm_ref.at[idx], kv_buf.at[slot, i], sems.at[slot])

        def start(kv_blk, slot):
            def body(i, carry):
                fetch, copy = page_copy(kv_blk, slot, i)
                pl.when(fetch)(copy.start)
                return carry
            lax.fori_loop(0, pages_per_blk, body, 0)

        def wait(kv_blk, slot):
            def body(i, carry):
                fetch, copy = page_copy(kv_blk, slot, i)
                pl.when(fetch)(copy.wait)
                return carry
            lax.fori_loop(0, pages_per_blk, body, 0)

        start(blk_lo, 0)

        def kv_body(kv_blk, slot):
            @pl.when(kv_blk + 1 < blk_hi)
            def _prefetch():
                start(kv_blk + 1, 1 - slot)

            wait(kv_blk, slot)
            col0 = kv_blk * kv_per_blk
            kv_ok = (col0 + kv_col_off >= kv_lo) & (col0 + kv_col_off < kv_hi)   # [kv_per_blk, 1]
            key_pos = col0 + col_off                                             # [bq*G, kv_per_blk]
            q_pos = row_tok + shift
            mask = (row_tok >= r0) & (row_tok < r1) & (key_pos <= q_pos) & kv_ok.reshape(1, -1)
            if sliding_window is not None:
                mask &= key_pos > q_pos - sliding_window
            for h in range(num_kv_heads):
                k = kv_buf[slot, :, :, 2 * h, :].reshape(kv_per_blk, head_dim)
                v = kv_buf[slot, :, :, 2 * h + 1, :].reshape(kv_per_blk, head_dim)
                k = k.astype(jnp.float32)
                v = v.astype(jnp.float32)
                if k_scale is not None:
                    k = k * k_scale
                if v_scale is not None:
                    v = v * v_scale
                k = jnp.where(kv_ok, k, 0.0).astype(q_ref.dtype)
                v = jnp.where(kv_ok, v, 0.0).astype(q_ref.dtype)
                q = q_all[:, h * group:(h + 1) * group, :].reshape(bq * group, head_dim)
                s = jnp.einsum("nd,md->nm", q, k, preferred_element_type=jnp.float32) * sm_scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(mask, s, MASK_VALUE)
                m_prev = m_ref[h][:, :1]                                         # [bq*G, 1]
                l_prev = l_ref[h][:, :1]
                m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
                alpha = jnp.exp(m_prev - m_next)
                l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
                pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
                # Rows of other sequences (mask all False) keep their state: p == 0, alpha == 1.
                m_ref[h] = jnp.broadcast_to(m_next, (bq * group, _LANES))
                l_ref[h] = jnp.broadcast_to(l_next, (bq * group, _LANES))
                acc_ref[h] = alpha * acc_ref[h] + pv
            return 1 - slot

        lax.fori_loop(blk_lo, blk_hi, kv_body, jnp.int32(0))

    def seq_cond(seq):
        return (seq < num_seqs) & (cu_q_lens_ref[jnp.minimum(seq, num_seqs)] < blk_end)

    def seq_step(seq):
        q_len = cu_q_lens_ref[seq + 1] - cu_q_lens_ref[seq]
        pl.when(q_len > 0)(lambda: seq_body(seq))
        return seq + 1

    lax.while_loop(seq_cond, seq_step, first_seq_ref[q_blk])

    for h in range(num_kv_heads):
        l = l_ref[h][:, :1]
        out = acc_ref[h] / jnp.where(l == 0.0, 1.0, l)                           # [bq*G, D]
        o_ref[:, h * group:(h + 1) * group, :] = out.reshape(bq, group, head_dim).astype(o_ref.dtype)


def _pick_block_sizes(num_tokens: int, page_size: int, pages_per_seq: int) -> tuple[int, int]:
    """Default (queries per block, pages per KV block): ~128 keys per KV block."""
    bq = min(32, max(8, pl.next_power_of_2(num_tokens)))
    pages_per_blk = max(1, min(pages_per_seq, 128 // page_size))
    return bq, pages_per_blk


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "interpret", "num_queries_per_block",
                                             "num_kv_pages_per_block"))
def ragged_paged_attention_mosaic_tpu(
    q: jax.Array,             # [T, Hq, D]
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * Hkv, D]
    kv_lens: jax.Array,       # i32[S]
    page_indices: jax.Array,  # i32[S, P]
    cu_q_lens: jax.Array,     # i32[S + 1]
    num_seqs: jax.Array,      # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    interpret: bool = False,
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
) -> jax.Array:               # [T, Hq, D]; rows of padding tokens are 0
    """Mosaic TPU ragged paged attention (same contract as the public dispatcher).

    ``interpret=True`` runs the kernel with the TPU interpreter (``pltpu.InterpretParams()``) on
    any platform, which is how CPU CI covers it. Block sizes default to ``_pick_block_sizes``.
    """
    T, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    _, pages_per_seq = page_indices.shape
    bq, pages_per_blk = _pick_block_sizes(T, page_size, pages_per_seq)
    bq = num_queries_per_block or bq
    pages_per_blk = num_kv_pages_per_block or pages_per_blk
    num_q_blocks = pl.cdiv(T, bq)
    padded_T = num_q_blocks * bq
    q_in = jnp.pad(q, ((0, padded_T - T), (0, 0), (0, 0))) if padded_T != T else q

    # First sequence overlapping each q block: seq i owns flat tokens [cu[i], cu[i+1]).
    blk_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    first_seq = jnp.searchsorted(cu_q_lens[1:], blk_starts, side="right").astype(jnp.int32)

    q_spec = pl.BlockSpec((bq, num_q_heads, head_dim), lambda i, *_: (i, 0, 0))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_q_blocks,),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_blk, page_size, num_combined, head_dim), kv_pages.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((num_kv_heads, bq * group, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, bq * group, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, bq * group, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        out_shape=jax.ShapeDtypeStruct(q_in.shape, q.dtype),
        interpret=_INTERPRET_MODE() if interpret else False,
        name="jaxllm_ragged_paged_attention",
    )(kv_lens, page_indices, cu_q_lens, first_seq, num_seqs, q_in, kv_pages)
    return out[:T]
