"""Ragged paged attention in Triton (``triton.language``), called through ``jax_triton``.

For GPUs before Hopper, and a second opinion on Hopper. One program = one query block
(up to ``block_q`` tokens of one sequence) x one kv head x one KV split. The block's rows are
(token, q head of this kv head) pairs, ``block_m = block_q * group`` of them, so each KV tile is
read once for all q heads that share it (GQA). Keys are gathered row by row through the page
table, so any page size works. When the grid is too small to fill the GPU (batch-1 decode over
a long context), the KV range is split over ``num_splits`` programs that write softmax partials,
merged afterwards by ``gpu_common.combine_splits`` (flash-decoding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.ragged_paged_attention import gpu_common

_LOG2E = 1.4426950408889634
_NEG_INF = tl.constexpr(float("-inf"))  # kernels may only read constexpr globals


@triton.jit
def _rpa_kernel(
    q_ptr, kv_ptr, kv_lens_ptr, page_idx_ptr, cu_ptr, blk_seq_ptr, blk_q0_ptr,
    scale_log2,                       # f32: sm_scale * k_scale * log2(e)
    soft_cap,                         # f32 (unused unless HAS_CAP)
    out_ptr, m_ptr, l_ptr,            # outputs (jax_triton appends them after the inputs)
    T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    PS: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    seq = tl.load(blk_seq_ptr + b)
    if seq < 0:
        return
    q0 = tl.load(blk_q0_ptr + b)                    # first token of the block inside seq
    cu0 = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - cu0
    kv_len = tl.load(kv_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G                             # [BM] token offset in seq
    head = h * G + rows % G                          # [BM] q head
    row_ok = (tok < q_len) & (rows < BLOCK_Q * G)
    q_pos = kv_len - q_len + tok                     # [BM] absolute position
    d = tl.arange(0, D)
    q_off = (cu0 + tok).to(tl.int64)[:, None] * (HQ * D) + head[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # q: [BM, D]

    # Keys this block can see: [lo, hi).
    last_tok = tl.minimum(q0 + BLOCK_Q, q_len) - 1
    hi = kv_len - q_len + last_tok + 1
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(kv_len - q_len + q0 - WINDOW + 1, 0)
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + sp * chunk
        hi = tl.minimum(hi, lo + chunk)

    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + n                            # [BN]
        k_ok = k_pos < hi
        page = tl.load(page_idx_ptr + seq * P + k_pos // PS, mask=k_ok, other=0)
        base = page.to(tl.int64) * (PS * 2 * HKV * D) + (k_pos % PS) * (2 * HKV * D) + 2 * h * D
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + D + d[None, :], mask=k_ok[:, None], other=0.0)
        k = k.to(q.dtype)                            # k: [BN, D]
        v = v.to(q.dtype)                            # v: [BN, D]
        s = tl.dot(q, tl.trans(k))                   # s: [BM, BN] (raw q.k)
        if HAS_CAP:
            # soft_cap * tanh(x / soft_cap), x = q.k * sm_scale; kept in log2 units.
            x = s * (scale_log2 / 1.4426950408889634) / soft_cap
            s = soft_cap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
        else:
            s = s * scale_log2
        mask = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(mask, s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o_rows = (cu0 + tok).to(tl.int64) * HQ + head    # [BM] flat (token, head) row
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = o_rows[:, None] * D + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = sp.to(tl.int64) * (T * HQ) + o_rows    # [BM]
        tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
        # m back to natural-log units for the combine.
        tl.store(m_ptr + part, m_i / 1.4426950408889634, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)


def _pick_blocks(t: int, s: int, group: int, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n): 16 rows for decode-like batches, 64 when queries are long."""
    min_m = 1 << max(4, math.ceil(math.log2(group)))
    block_m = min_m if t <= 2 * s else max(min_m, 64)
    block_n = 64 if head_dim <= 128 else 32
    return block_m, block_n


def _pick_splits(work: int, max_kv: int, t: int, hq: int, d: int, num_sms: int) -> int:
    """KV splits so that work * splits >= 2 waves of SMs, at least 512 keys per split.

    Measured (run 2, H100): fine where kv heads x blocks >= 256; Qwen (4 kv heads) b32 x 8k
    got only 3 splits and 40% of copy bandwidth. A 4-wave target is the next thing to try.
    """
    if work >= 2 * num_sms:
        return 1
    splits = min(-(-2 * num_sms // work), max(1, max_kv // 512), 64)
    while splits > 1 and splits * t * hq * d * 4 > (256 << 20):
        splits //= 2
    return max(splits, 1)


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # pragma: no cover - no device
        return 132


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "interpret", "block_m", "block_n",
                                             "num_splits", "num_warps", "num_stages"))
def ragged_paged_attention_triton(
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
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Ragged paged attention (contract of ``pallas_kernels.ragged_paged_attention``) in Triton.

    ``block_m`` / ``block_n`` / ``num_splits`` / ``num_warps`` / ``num_stages`` are tuning knobs;
    None picks them from the static shapes. ``interpret`` is not supported (Triton needs a GPU).
    """
    import jax_triton as jt  # lazy: only on GPU hosts

    if interpret:
        raise ValueError("interpret: the Triton backend runs on GPUs only; use backend='reference'")
    gpu_common.check_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                            sliding_window, soft_cap)
    t, hq, d = q.shape
    _, ps, hc, _ = kv_pages.shape
    hkv = hc // 2
    group = hq // hkv
    s, p = page_indices.shape
    bm, bn = _pick_blocks(t, s, group, d)
    bm = block_m or bm
    bn = block_n or bn
    if bm < group or bm & (bm - 1) or bm < 16:
        raise ValueError(f"block_m: must be a power of two >= max(16, group={group}), got {bm}")
    block_q = bm // group
    nb = gpu_common.num_q_blocks(t, s, block_q)
    splits = num_splits or _pick_splits(nb * hkv, p * ps, t, hq, d, _num_sms())
    blk_seq, blk_q0 = gpu_common.q_block_table(cu_q_lens, num_seqs, nb, block_q)
    scale_log2 = float(sm_scale * (k_scale if k_scale is not None else 1.0) * _LOG2E)

    meta = dict(T=t, HQ=hq, HKV=hkv, D=d, PS=ps, P=p, G=group, BLOCK_Q=block_q, BLOCK_M=bm,
                BLOCK_N=bn, NUM_SPLITS=splits, WINDOW=sliding_window or 0,
                HAS_CAP=soft_cap is not None)
    args = (q, kv_pages, kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32),
            cu_q_lens.astype(jnp.int32), blk_seq, blk_q0)
    scalars = (np.float32(scale_log2), np.float32(soft_cap or 1.0))  # fp32 kernel scalars
    if splits == 1:
        out, _, _ = _call(jt, args, scalars, meta, (t, hq, d), q.dtype, (nb, hkv, 1), num_warps,
                          num_stages, split=False)
        out = out.astype(jnp.float32)
    else:
        acc, m, l = _call(jt, args, scalars, meta, (t, hq, d), q.dtype, (nb, hkv, splits),
                          num_warps, num_stages, split=True)
        out = gpu_common.combine_splits(acc, m, l)
        valid = gpu_common.valid_token_mask(cu_q_lens, num_seqs, t)
        out = jnp.where(valid[:, None, None], out, 0.0)
    if v_scale is not None:
        out = out * v_scale
    return out.astype(q.dtype)


def _call(jt, args, scalars, meta, out_shape, dtype, grid, num_warps, num_stages, *, split):
    """One jax_triton launch; outputs (out, m, l) follow the kernel's pointer order."""
    t, hq, d = out_shape
    ns = grid[2]
    if split:
        shapes = (jax.ShapeDtypeStruct((ns, t, hq, d), jnp.float32),
                  jax.ShapeDtypeStruct((ns, t, hq), jnp.float32),
                  jax.ShapeDtypeStruct((ns, t, hq), jnp.float32))
        zeroed = ()
    else:
        shapes = (jax.ShapeDtypeStruct(out_shape, dtype),
                  jax.ShapeDtypeStruct((1,), jnp.float32),
                  jax.ShapeDtypeStruct((1,), jnp.float32))
        zeroed = (0,)  # padding tokens (no block writes them) must read as 0
    # Scalars go between the array inputs and the outputs, in kernel argument order.
    return jt.triton_call(*args, *scalars, kernel=_rpa_kernel, out_shape=shapes, grid=grid,
                          num_warps=num_warps, num_stages=num_stages, zeroed_outputs=zeroed,
                          **meta)
