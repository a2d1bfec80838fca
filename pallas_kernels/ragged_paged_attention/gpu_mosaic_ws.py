"""Warp-specialized Mosaic GPU ragged paged attention for prefill-heavy batches (Hopper, sm_90).

The structure of JAX's FlashAttention-3 kernel (``pallas/ops/gpu/attention_mgpu.py``) on the
paged, ragged layout of ``gpu_mosaic``: one CTA = one 128-row block (rows = token*G + g of ONE
sequence, see ``gpu_mosaic``) x one kv head, run by three warpgroups:
  * warpgroups 0 and 1 (compute, 232 registers each) own 64 query rows each: S = Q K^T and
    O += P V on wgmma, online softmax in registers. A two-arrival "schedule" barrier makes them
    ping-pong, so one's softmax overlaps the other's matmuls;
  * warpgroup 2 (producer, 40 registers) issues the per-page TMA loads of K and V into a
    ``stages``-deep ring and refills a slot once both compute warpgroups have marked it consumed.
Both compute warpgroups walk the same KV tiles (the union of their causal / window ranges:
at most one extra, fully masked tile for one of them; such a tile before the real ones is
wiped by the online softmax's rescale, after them it adds exact zeros). No KV splits: decode-heavy
calls belong to ``gpu_mosaic`` (split-K).

NaN safety as in ``gpu_mosaic``: K NaN only reaches S entries that are masked by ``where``; V
rows a query may not see are zeroed in shared memory on the (at most two) boundary tiles. Each
compute warpgroup zeroes the whole tile itself before its PV wgmma; the two write identical
values, so neither needs to wait for the other (the producer refills the slot only after both
have arrived on its "consumed" barrier).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention import gpu_common
from pallas_kernels.ragged_paged_attention import gpu_mosaic as gm

WG_ROWS = 64                    # rows per compute warpgroup (wgmma M)
COMPUTE_WGS = 2
BLOCK_Q = COMPUTE_WGS * WG_ROWS  # rows per CTA


def _kernel(q_ref, kv_ref, pt_ref, meta_ref, o_ref, q_smem2, k_smem, v_smem, q_bar, k_bar,
            v_bar, k_free, v_free, sched, *, group, page_size, block_n, stages, scale_log2,
            soft_cap, window, dtype, interpret):
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    wg = lax.axis_index("wg")
    ppt = block_n // page_size                               # pages per KV tile
    seq_c = jnp.maximum(meta_ref[b, gm._SEQ], 0)
    qpos0 = meta_ref[b, gm._QPOS0]
    r0 = meta_ref[b, gm._R0]
    kv_len = meta_ref[b, gm._KVLEN]
    tbeg = meta_ref[b, gm._TBEG]
    tend = meta_ref[b, gm._TEND]
    lastcol = meta_ref[b, gm._LASTCOL]
    lo = meta_ref[b, gm._LO]
    cast = (lambda x, _: x) if interpret else plgpu.layout_cast
    iota = ((lambda dt, sh, dim: lax.broadcasted_iota(dt, sh, dim)) if interpret else
            (lambda dt, sh, dim: plgpu.broadcasted_iota(dt, sh, dim, layout=plgpu.Layout.WGMMA)))

    def schedule_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[h, b, wg], q_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        m_i = cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = cast(jnp.full((WG_ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = cast(jnp.full((WG_ROWS, q_smem.shape[-1]), 0, jnp.float32), plgpu.Layout.WGMMA)
        pl.when(wg == 1)(schedule_barrier)                  # wg 1 starts half a step behind

        def body(tile, carry, masked=True):
            acc, m_i, l_i = carry
            slot = lax.rem(tile - tbeg, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                schedule_barrier()
                return acc_ref[...]
            if interpret:   # no wgmma / run_state in the GPU interpreter: same math, jnp.dot
                s = jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                schedule_barrier()
            else:
                s = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, block_n), jnp.float32))  # [64, BN]
            plgpu.barrier_arrive(k_free.at[slot])
            if soft_cap is not None:
                s = jnp.tanh(s * (scale_log2 / gm._LOG2E / soft_cap)) * (soft_cap * gm._LOG2E)
            else:
                s = s * scale_log2
            if masked:   # iotas built here, not carried: registers are the compute WG's limit
                rows = iota(jnp.int32, (WG_ROWS, block_n), 0)
                q_pos = qpos0 + lax.div(r0 + wg * WG_ROWS + rows, jnp.int32(group))  # [64, BN]
                k_pos = tile * block_n + iota(jnp.int32, (WG_ROWS, block_n), 1)
                mask = (k_pos <= q_pos) & (k_pos < kv_len)
                if window is not None:
                    mask = mask & (k_pos > q_pos - window)
                s = jnp.where(mask, s, gm._MASK)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)                      # softmax done
            plgpu.barrier_wait(v_bar.at[slot])
            if masked:
                gm._zero_invisible_v(v_smem.at[slot], tile, kv_len, lo, block_n=block_n,
                                     window=window, iota=iota)
            plgpu.barrier_wait(sched)                        # tensor cores free

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            if interpret:
                acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
            else:
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        # Without a window, tiles wholly below this warpgroup's first query position (and below
        # kv_len) are visible to all its rows: no mask, no V fix-up there (as attention_mgpu).
        t_full = tbeg
        if window is None:
            first_pos = qpos0 + lax.div(r0 + wg * WG_ROWS, jnp.int32(group))
            t_full = jnp.clip(jnp.minimum(first_pos + 1, kv_len) // block_n, tbeg, tend)
        carry = lax.fori_loop(tbeg, t_full, functools.partial(body, masked=False),
                              (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(t_full, tend, body, carry)
        pl.when(wg == 0)(schedule_barrier)                  # balance wg 1's head start
        l_safe = jnp.maximum(l_i, 1e-30)
        q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[h, b, wg])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def issue(tile, slot, which, bar):
            for j in range(ppt):
                col = jnp.minimum(tile * ppt + j, lastcol)   # never past the seq's pages
                page = pt_ref[seq_c, col]
                dst = pl.ds(j * page_size, page_size)
                smem = k_smem if which == 0 else v_smem
                plgpu.copy_gmem_to_smem(kv_ref.at[page, :, 2 * h + which], smem.at[slot, dst],
                                        bar.at[slot])

        for st in range(stages):
            @pl.when(tbeg + st < tend)
            def _():
                issue(tbeg + st, st, 0, k_bar)
                issue(tbeg + st, st, 1, v_bar)

        @pl.loop(tbeg + stages, tend)
        def _refill(tile):
            slot = lax.rem(tile - tbeg, jnp.int32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            issue(tile, slot, 0, k_bar)
            plgpu.barrier_wait(v_free.at[slot])
            issue(tile, slot, 1, v_bar)

        # Observe the last "consumed" phases too (free on the GPU; keeps every barrier phase
        # observed by every thread that waits on it, as the GPU interpreter checks).
        @pl.loop(jnp.maximum(tend - stages, tbeg), tend)
        def _drain(tile):
            slot = lax.rem(tile - tbeg, jnp.int32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "interpret", "stages", "lowering",
                                             "block_n", "num_splits"))
def ragged_paged_attention_mosaic_gpu_ws(
    q: jax.Array,             # [T, num_q_heads, head_dim]
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: jax.Array,       # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,     # i32[S + 1]
    num_seqs: jax.Array,      # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    interpret: bool = False,
    stages: int | None = None,
    lowering: str | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Warp-specialized ragged paged attention (contract of ``ragged_paged_attention``).

    Same limits and knobs as ``gpu_mosaic.ragged_paged_attention_mosaic_gpu`` except that
    ``num_splits`` must be None or 1 (no split-K here). Defaults: 128-key tiles in a 2-deep
    ring where they fit (head_dim <= 128, page_size <= 128; H100 session 3: 61-62% of the bf16
    matmul rate on 1 x 8k prefill against 53-55% with 64-key tiles in 3 stages), else 64-key
    tiles (or one page) in 3 stages.
    """
    if num_splits not in (None, 1):
        raise ValueError(f"num_splits: the warp-specialized kernel has no KV splits (None or 1), "
                         f"got {num_splits}")
    big = q.shape[-1] <= 128 and kv_pages.shape[1] <= 128
    if block_n is None and stages is None and big:
        block_n, stages = 128, 2
    stages = 3 if stages is None else stages
    block_n = gm.check_args(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                            sliding_window=sliding_window, soft_cap=soft_cap, stages=stages,
                            block_n=block_n, num_splits=None, block_m=WG_ROWS,
                            smem_q_rows=BLOCK_Q)
    t, hq, d = q.shape
    _, ps, hc, _ = kv_pages.shape
    hkv = hc // 2
    group = hq // hkv
    s, _ = page_indices.shape
    kv = kv_pages.astype(q.dtype)
    n_rows = t * group
    nb = gpu_common.num_q_blocks(n_rows, s, BLOCK_Q)
    meta = gm._block_meta(kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_seqs,
                          group=group, nb=nb, block_n=block_n, page_size=ps,
                          window=sliding_window, block_m=BLOCK_Q)
    q_blk = gm.q_blocks(q, meta, hkv, BLOCK_Q).reshape(hkv, nb, COMPUTE_WGS, WG_ROWS, d)
    scale_log2 = float(sm_scale * (k_scale if k_scale is not None else 1.0) * gm._LOG2E)

    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    arrivals = block_n // ps                                  # one TMA per page
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), q.dtype, transforms=transforms),   # q, then o
        plgpu.SMEM((stages, block_n, d), q.dtype, transforms=transforms),        # K ring
        plgpu.SMEM((stages, block_n, d), q.dtype, transforms=transforms),        # V ring
    )
    barriers = (
        plgpu.Barrier(num_barriers=COMPUTE_WGS),                                  # q landed
        plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),                # K landed
        plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),                # V landed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),             # K consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),             # V consumed
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=1),                  # schedule
    )
    body = functools.partial(
        _kernel, group=group, page_size=ps, block_n=block_n, stages=stages,
        scale_log2=scale_log2, soft_cap=soft_cap, window=sliding_window, dtype=q.dtype,
        interpret=interpret)

    def entry(q_ref, kv_ref, pt_ref, meta_ref, o_ref):
        def scoped(smem, bars):
            @pl.when(meta_ref[lax.axis_index("b"), gm._SEQ] >= 0)
            def _():
                q_bar, k_bar, v_bar, k_free, v_free, sched = bars
                body(q_ref, kv_ref, pt_ref, meta_ref, o_ref, *smem, q_bar, k_bar, v_bar,
                     k_free, v_free, sched.at[0])
        pl.run_scoped(scoped, scratch, barriers, collective_axes="wg")

    kw, sem = {}, {}
    if lowering is not None:
        sem["lowering_semantics"] = getattr(plgpu.LoweringSemantics, lowering)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    o_blk = plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((hkv, nb, COMPUTE_WGS, WG_ROWS, d), q.dtype),
        grid=(nb, hkv), grid_names=("b", "h"), num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **sem), **kw,
    )(q_blk, kv, page_indices.astype(jnp.int32), meta)

    o = gm.unblock(o_blk.reshape(1, hkv, nb, BLOCK_Q, d), None, meta, n_rows, BLOCK_Q)
    return gm.finish(o, q, cu_q_lens, num_seqs, v_scale)
