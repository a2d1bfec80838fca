"""Ragged paged attention as a Pallas Mosaic GPU kernel (Hopper, sm_90: TMA + wgmma).

Layout trick: q [T, Hq, D] is regrouped to rows [Hkv, T*G, D] (row = token*G + g), so one
64-row wgmma tile holds all G q heads of a kv head for 64/G consecutive tokens of ONE sequence
and each KV tile is read once for all of them (GQA). One program = one such row block x one kv
head x one KV split:
  * the block's 64 query rows arrive by TMA;
  * KV tiles of BN = max(64, page_size) keys arrive page by page by TMA (K and V of kv head h are
    combined heads 2h / 2h+1 of kv_pages), ``stages`` tiles in flight on mbarriers;
  * S = Q K^T and O += P V run on wgmma, online softmax in registers (exp2, f32);
  * with ``num_splits > 1`` (decode over long contexts, when the grid alone cannot fill the SMs)
    each split writes its normalized partial output and log-sum-exp, merged afterwards
    (flash-decoding).
Block -> (sequence, rows, KV tile range) metadata is computed by a few XLA ops first.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention import gpu_common

BLOCK_M = 64                    # rows per program: one warpgroup's wgmma M
_MASK = -1e30                   # finite: fully masked rows stay NaN-free, later tiles wipe them
_LOG2E = 1.4426950408889634
SMEM_BYTES = 220 * 1024         # of the 227 KiB a Hopper CTA may use: room for barriers
# meta columns (i32[NB, 9]) of each row block; keys [_LO, hi) may be seen by some row of it.
_SEQ, _ROW0, _QPOS0, _R0, _KVLEN, _TBEG, _TEND, _LASTCOL, _LO = range(9)


def _block_meta(kv_lens, cu_q_lens, num_seqs, *, group, nb, block_n, page_size, window,
                block_m=BLOCK_M):
    """i32[NB, 9] metadata per row block (see the column names above)."""
    cu_rows = cu_q_lens * group
    blk_seq, blk_r0 = gpu_common.q_block_table(cu_rows, num_seqs, nb, block_m)
    seq = jnp.maximum(blk_seq, 0)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    kv_len = kv_lens[seq]
    qpos0 = kv_len - q_len                                   # position of the seq's token 0
    first_tok = blk_r0 // group
    last_tok = jnp.minimum((blk_r0 + block_m - 1) // group, q_len - 1)
    hi = qpos0 + last_tok + 1                                # keys [lo, hi)
    lo = jnp.zeros_like(hi)
    if window is not None:
        lo = jnp.maximum(qpos0 + first_tok - window + 1, 0)
    tbeg = lo // block_n
    tend = (hi + block_n - 1) // block_n
    tend = jnp.where(blk_seq < 0, tbeg, tend)
    lastcol = jnp.maximum((kv_len + page_size - 1) // page_size - 1, 0)
    row0 = cu_rows[seq] + blk_r0
    return jnp.stack([blk_seq, row0, qpos0, blk_r0, kv_len, tbeg, tend, lastcol, lo],
                     axis=1).astype(jnp.int32)


def _kernel(q_ref, kv_ref, pt_ref, meta_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem,
            q_bar, k_bar, v_bar, *, group, page_size, block_n, stages, num_splits, scale_log2,
            soft_cap, window, dtype, interpret):
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    sp = lax.axis_index("s")
    ppt = block_n // page_size                               # pages per KV tile
    seq = meta_ref[b, _SEQ]
    qpos0 = meta_ref[b, _QPOS0]
    r0 = meta_ref[b, _R0]
    kv_len = meta_ref[b, _KVLEN]
    tbeg = meta_ref[b, _TBEG]
    tend = meta_ref[b, _TEND]
    lastcol = meta_ref[b, _LASTCOL]
    lo = meta_ref[b, _LO]
    if num_splits > 1:
        per = (tend - tbeg + num_splits - 1) // num_splits
        tbeg = jnp.minimum(tbeg + sp * per, tend)
        tend = jnp.minimum(tbeg + per, tend)
    seq_c = jnp.maximum(seq, 0)

    def issue(tile, slot):
        for j in range(ppt):
            col = jnp.minimum(tile * ppt + j, lastcol)       # never read past the seq's pages
            page = pt_ref[seq_c, col]
            dst = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(kv_ref.at[page, :, 2 * h], k_smem.at[slot, dst],
                                    k_bar.at[slot])
            plgpu.copy_gmem_to_smem(kv_ref.at[page, :, 2 * h + 1], v_smem.at[slot, dst],
                                    v_bar.at[slot])

    # q arrives pre-blocked, [Hkv, NB, BLOCK_M, D]: every TMA index is tile-aligned.
    plgpu.copy_gmem_to_smem(q_ref.at[h, b], q_smem, q_bar)
    for st in range(stages):
        @pl.when(tbeg + st < tend)
        def _():
            issue(tbeg + st, st)
    plgpu.barrier_wait(q_bar)

    # Register layouts are a compile-time notion the GPU interpreter does not model.
    cast = (lambda x, _: x) if interpret else plgpu.layout_cast
    iota = ((lambda dt, sh, dim: lax.broadcasted_iota(dt, sh, dim)) if interpret else
            (lambda dt, sh, dim: plgpu.broadcasted_iota(dt, sh, dim, layout=plgpu.Layout.WGMMA)))
    m_i = cast(jnp.full((BLOCK_M,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = cast(jnp.full((BLOCK_M,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = cast(jnp.full((BLOCK_M, q_smem.shape[-1]), 0, jnp.float32), plgpu.Layout.WGMMA)
    rows = iota(jnp.int32, (BLOCK_M, block_n), 0)
    cols = iota(jnp.int32, (BLOCK_M, block_n), 1)
    q_pos = qpos0 + lax.div(r0 + rows, jnp.int32(group))    # [BM, BN] query position

    def body(tile, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(tile - tbeg, jnp.int32(stages))
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]
        if interpret:  # the GPU interpreter models neither wgmma on transposed refs nor run_state
            s = jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
        else:
            s = pl.run_scoped(qk, plgpu.ACC((BLOCK_M, block_n), jnp.float32))  # s: [BM, BN]
        if soft_cap is not None:
            s = jnp.tanh(s * (scale_log2 / _LOG2E / soft_cap)) * (soft_cap * _LOG2E)
        else:
            s = s * scale_log2
        k_pos = tile * block_n + cols
        mask = (k_pos <= q_pos) & (k_pos < kv_len)
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])
        _zero_invisible_v(v_smem.at[slot], tile, kv_len, lo, block_n=block_n, window=window,
                          iota=iota)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
        if interpret:
            acc = acc + jnp.dot(p.astype(dtype), v_smem[slot], preferred_element_type=jnp.float32)
        else:          # accumulate into acc in place (as jax's attention_mgpu)
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))

        @pl.when(tile + stages < tend)
        def _():
            issue(tile + stages, slot)
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(tbeg, tend, body, (acc, m_i, l_i))
    l_safe = jnp.maximum(l_i, 1e-30)
    q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
    if lse_smem is not None:
        lse_smem[...] = m_i + jnp.log(l_safe) * _LOG2E          # log2 units
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[sp, h, b])
    if lse_smem is not None:
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[sp, h, b])
    plgpu.wait_smem_to_gmem(0)


def check_args(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sliding_window,
               soft_cap, stages, block_n, num_splits, block_m, smem_q_rows=None) -> int:
    """Shape/knob checks of the Mosaic GPU kernels (ValueError naming the field); returns
    the KV tile size block_n."""
    gpu_common.check_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                            sliding_window, soft_cap)
    t, hq, d = q.shape
    _, ps, hc, _ = kv_pages.shape
    hkv = hc // 2
    group = hq // hkv
    s, p = page_indices.shape
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"q: dtype must be bfloat16 or float16, got {q.dtype}")
    if d % 64:
        raise ValueError(f"q: head_dim must be a multiple of 64 for mosaic_gpu, got {d}")
    if ps < 8 or ps > 256 or ps & (ps - 1):
        raise ValueError(f"kv_pages: page_size must be a power of two in [8, 256], got {ps}")
    if group > block_m:
        raise ValueError(f"q: num_q_heads / num_kv_heads must be <= {block_m}, got {group}")
    if stages < 1:
        raise ValueError(f"stages: must be >= 1, got {stages}")
    if num_splits is not None and not 1 <= num_splits <= 64:
        raise ValueError(f"num_splits: must be None or in [1, 64], got {num_splits}")
    block_n = block_n or max(64, ps)
    if block_n % 64 or block_n % ps or block_n > 256:
        raise ValueError(f"block_n: must be a multiple of 64 and of page_size ({ps}) in "
                         f"[64, 256], got {block_n}")
    smem = ((smem_q_rows or block_m) + 2 * stages * block_n) * d * q.dtype.itemsize
    if smem > SMEM_BYTES:
        raise ValueError(f"stages: {stages} stages of {block_n}x{d} K and V tiles need {smem} B "
                         f"of shared memory, more than {SMEM_BYTES}; use fewer stages or a "
                         "smaller block_n")
    return block_n


def _zero_invisible_v(v_ref, tile, kv_len, lo, *, block_n, window, iota):
    """Zeroes the V rows of a boundary KV tile that no query of the block may see.

    P is 0 at those keys, but they may hold anything (NaN in a never-written slot) and 0 * NaN
    is NaN in the PV matmul. Only two tiles can hold such keys: the one with key kv_len - 1
    (slots past kv_len in the last, partly used page, and re-read clamped pages), and with a
    sliding window the one with key ``lo`` (slots before the block's window). K needs nothing:
    its NaN reaches only S entries that ``where(mask, s, _MASK)`` replaces.
    """
    last = (tile == (kv_len - 1) // block_n) & (lax.rem(kv_len, jnp.int32(block_n)) != 0)
    need = last
    if window is not None:
        need = need | ((tile == lo // block_n) & (lax.rem(lo, jnp.int32(block_n)) != 0))

    @pl.when(need)
    def _():
        k_pos = tile * block_n + iota(jnp.int32, v_ref.shape, 0)   # [BN, D] key position
        ok = k_pos < kv_len
        if window is not None:
            ok = ok & (k_pos >= lo)
        v = v_ref[...]                                             # v: [BN, D]
        v_ref[...] = jnp.where(ok, v, jnp.zeros_like(v))
        plgpu.commit_smem()   # make the stores visible to wgmma (async proxy), sync the WG


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "interpret", "num_splits", "stages",
                                             "lowering", "block_n"))
def ragged_paged_attention_mosaic_gpu(
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
    num_splits: int | None = None,
    stages: int = 3,
    lowering: str | None = None,
    block_n: int | None = None,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Ragged paged attention (contract of ``pallas_kernels.ragged_paged_attention``) on Hopper.

    Needs bf16/f16 q and kv_pages, head_dim a multiple of 64, page_size a power of two in
    [8, 256]. ``num_splits`` (KV splits per row block; None: picked from the static shapes),
    ``stages`` (KV tiles in flight) and ``block_n`` (keys per KV tile: a multiple of 64 and of
    page_size, <= 256; None: max(64, page_size)) are tuning knobs;
    ``lowering`` ("Lane" / "Warpgroup" / None: JAX's default) picks Mosaic GPU's semantics.
    """
    block_n = check_args(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                         sliding_window=sliding_window, soft_cap=soft_cap, stages=stages,
                         block_n=block_n, num_splits=num_splits, block_m=BLOCK_M)
    t, hq, d = q.shape
    _, ps, hc, _ = kv_pages.shape
    hkv = hc // 2
    group = hq // hkv
    s, p = page_indices.shape
    kv = kv_pages.astype(q.dtype)   # fp8 caches: one cast (TODO: in-kernel dequant)
    n_rows = t * group
    nb = gpu_common.num_q_blocks(n_rows, s, BLOCK_M)
    ns = num_splits or _pick_splits(nb * hkv, p * ps // block_n, hkv * nb * BLOCK_M * (d + 2) * 2,
                                    _num_sms())
    meta = _block_meta(kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_seqs,
                       group=group, nb=nb, block_n=block_n, page_size=ps, window=sliding_window)
    q_blk = q_blocks(q, meta, hkv, BLOCK_M).reshape(hkv, nb, BLOCK_M, d)
    scale_log2 = float(sm_scale * (k_scale if k_scale is not None else 1.0) * _LOG2E)

    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    scratch = [
        plgpu.SMEM((BLOCK_M, d), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, block_n, d), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, block_n, d), q.dtype, transforms=transforms),
        plgpu.SMEM((BLOCK_M,), jnp.float32) if ns > 1 else None,
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=block_n // ps, num_barriers=stages),
        plgpu.Barrier(num_arrivals=block_n // ps, num_barriers=stages),
    ]
    body = functools.partial(
        _kernel, group=group, page_size=ps, block_n=block_n, stages=stages, num_splits=ns,
        scale_log2=scale_log2, soft_cap=soft_cap, window=sliding_window, dtype=q.dtype,
        interpret=interpret)

    def entry(q_ref, kv_ref, pt_ref, meta_ref, o_ref, lse_ref):
        def scoped(q_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar):
            @pl.when(meta_ref[lax.axis_index("b"), _SEQ] >= 0)
            def _():
                body(q_ref, kv_ref, pt_ref, meta_ref, o_ref, lse_ref, q_smem, k_smem, v_smem,
                     lse_smem, q_bar.at[0], k_bar, v_bar)
        pl.run_scoped(scoped, *scratch)

    out_type = (jax.ShapeDtypeStruct((ns, hkv, nb, BLOCK_M, d), q.dtype),
                jax.ShapeDtypeStruct((ns, hkv, nb, BLOCK_M), jnp.float32))
    kw = {}
    sem = {}
    if lowering is not None:
        sem["lowering_semantics"] = getattr(plgpu.LoweringSemantics, lowering)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    o_blk, lse = plgpu.kernel(
        entry, out_type=out_type, grid=(nb, hkv, ns), grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True, **sem), **kw,
    )(q_blk, kv, page_indices.astype(jnp.int32), meta)

    o = unblock(o_blk, lse if ns > 1 else None, meta, n_rows, BLOCK_M)   # [Hkv, R, D] f32
    return finish(o, q, cu_q_lens, num_seqs, v_scale)


def finish(o, q, cu_q_lens, num_seqs, v_scale) -> jax.Array:
    """Rows [Hkv, T*G, D] (row = token*G + g) back to q's [T, Hq, D] layout and dtype; padding
    tokens zeroed, the V scale applied."""
    t, hq, d = q.shape
    hkv = o.shape[0]
    out = o.reshape(hkv, t, hq // hkv, d).transpose(1, 0, 2, 3).reshape(t, hq, d)
    valid = gpu_common.valid_token_mask(cu_q_lens, num_seqs, t)
    out = jnp.where(valid[:, None, None], out, 0.0)
    if v_scale is not None:
        out = out * v_scale
    return out.astype(q.dtype)


def q_blocks(q, meta, hkv: int, block_m: int) -> jax.Array:
    """q [T, Hq, D] -> rows [Hkv, T*G, D] (row = token*G + g) gathered per row block:
    [Hkv, NB * block_m, D]. Rows past the end read row 0 and are never written back."""
    t, hq, d = q.shape
    n_rows = t * (hq // hkv)
    q_rows = q.reshape(t, hkv, hq // hkv, d).transpose(1, 0, 2, 3).reshape(hkv, n_rows, d)
    ridx = meta[:, _ROW0][:, None] + jnp.arange(block_m, dtype=jnp.int32)[None, :]  # [NB, BM]
    ridx = jnp.where(ridx < n_rows, ridx, 0).reshape(-1)
    return q_rows[:, ridx]


def unblock(o_blk, lse, meta, n_rows: int, block_m: int) -> jax.Array:
    """Per-block outputs back to rows, merging KV splits (flash-decoding combine).

    Args:
      o_blk: ``[NS, Hkv, NB, block_m, D]`` each split's normalized output.
      lse: ``f32[NS, Hkv, NB, block_m]`` each split's log2-sum-exp2, or None when NS == 1.
      meta: ``i32[NB, 9]`` block metadata.
    Returns:
      ``f32[Hkv, n_rows, D]``; row r of kv head h lives in block blk[r] at offset r - row0.
    """
    nb = meta.shape[0]
    rows = jnp.arange(n_rows, dtype=jnp.int32)
    valid_blk = meta[:, _SEQ] >= 0
    starts = jnp.where(valid_blk, meta[:, _ROW0], jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(starts)
    blk = order[jnp.clip(jnp.searchsorted(starts[order], rows, side="right") - 1, 0, nb - 1)]
    off = jnp.clip(rows - meta[blk, _ROW0], 0, block_m - 1)
    o = o_blk[:, :, blk, off]                                 # [NS, Hkv, R, D]
    if lse is not None:
        l2 = lse[:, :, blk, off]                               # [NS, Hkv, R]
        ok = jnp.isfinite(l2) & (l2 > 0.5 * _MASK)
        l2 = jnp.where(ok, l2, -jnp.inf)
        mx = jnp.max(l2, axis=0)
        w = jnp.where(ok, jnp.exp2(l2 - jnp.where(jnp.isfinite(mx), mx, 0.0)[None]), 0.0)
        o = jnp.where(ok[..., None], o.astype(jnp.float32), 0.0)
        o = jnp.sum(w[..., None] * o, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]
    else:
        o = o[0].astype(jnp.float32)
    return o


# Decode split-K: split the KV range until the grid covers ~SPLIT_WAVES waves of SMs, each split
# keeping >= MIN_SPLIT_TILES KV tiles. Measured on the H100: 2 waves / 8 tiles (run 3) beat
# 4 waves / 4 tiles (run 5) on most small grids (Qwen b32x8k 58% vs 35% of copy bandwidth, Llama
# b1x32k 63% vs 47%, Llama b32x8k 74% vs 71%; Qwen b1x32k 31% vs 36%), so run 3's values stand.
SPLIT_WAVES = 2
MIN_SPLIT_TILES = 8
MAX_SPLITS = 32
MAX_PARTIALS_BYTES = 256 << 20


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132
    except Exception:  # pragma: no cover - no backend
        return 132


def _pick_splits(work: int, kv_tiles: int, partial_bytes: int, num_sms: int) -> int:
    """KV splits per row block (flash decoding) from the static shapes.

    Args:
      work: programs without splitting (row blocks x kv heads).
      kv_tiles: KV tiles of the longest possible context.
      partial_bytes: bytes of one split's partial outputs (capped at MAX_PARTIALS_BYTES total).
      num_sms: streaming multiprocessors of the device.
    """
    if work >= SPLIT_WAVES * num_sms:
        return 1
    ns = min(-(-SPLIT_WAVES * num_sms // work), kv_tiles // MIN_SPLIT_TILES, MAX_SPLITS,
             MAX_PARTIALS_BYTES // max(partial_bytes, 1))
    return max(1, ns)


def kernel_from_name(name: str):
    """The Mosaic GPU kernel a benchmark/check backend name selects, knobs bound.

    ``mosaic_gpu[_ws][_lane|_wg][:knob...]``: ``_ws`` the warp-specialized prefill kernel
    (``gpu_mosaic_ws``), ``_lane`` / ``_wg`` Mosaic GPU's Lane / Warpgroup lowering semantics
    (default: JAX's), knobs ``bn<block_n>``, ``s<stages>``, ``sp<num_splits>`` separated by
    colons (no commas: the tools split backend lists on them); e.g. ``mosaic_gpu:bn128:s2:sp16``
    or ``mosaic_gpu_ws_lane``.
    """
    base, *knobs = name.split(":")
    parts = base.split("_")
    if parts[:2] != ["mosaic", "gpu"] or not set(parts[2:]) <= {"ws", "lane", "wg"}:
        raise ValueError(f"backend: expected mosaic_gpu[_ws][_lane|_wg][:knob...], got {name!r}")
    kw = {"lowering": "Lane" if "lane" in parts else "Warpgroup" if "wg" in parts else None}
    for k in knobs:
        m = re.fullmatch(r"(bn|sp|s)(\d+)", k)
        if m is None:
            raise ValueError(f"backend: unknown knob {k!r} in {name!r} (bn<int>, s<int>, sp<int>)")
        kw[{"bn": "block_n", "sp": "num_splits", "s": "stages"}[m[1]]] = int(m[2])
    if "ws" in parts:
        from pallas_kernels.ragged_paged_attention.gpu_mosaic_ws import (
            ragged_paged_attention_mosaic_gpu_ws as fn)
    else:
        fn = ragged_paged_attention_mosaic_gpu
    return functools.partial(fn, **kw)
