"""Ragged paged attention in Triton (``triton.language``), called through ``jax_triton``.

For GPUs before Hopper, and a second opinion on Hopper. One program = one query block (up to
``block_q`` tokens of one sequence) x one kv head x one KV split. The block's rows are
(token, q head of this kv head) pairs, ``block_m = block_q * group`` of them, so each K/V tile
is read once for all q heads that share it (GQA packing).

Everything runs in at most two kernel launches, with no XLA ops around them:
  * the block -> (sequence, first token) map is a binary search over ``cu_q_lens`` inside the
    kernel (block ``b`` of sequence ``i`` is ``cu_q_lens[i] // block_q + i + j``: a closed-form,
    monotone start per sequence; grid ``T // block_q + S``, surplus blocks exit at once);
  * keys a whole block can see (below its first query's position) go through an unmasked loop;
    only the tiles on the causal diagonal (and, with a sliding window, every tile) are masked;
  * K/V rows are addressed through the page table with one scalar page load per tile when a
    tile lies inside one page (``page_mode=2``: page_size % block_n == 0), else row by row
    (``page_mode=0``; the row gathers coalesce: one 2*head_dim-byte row per key). Loading the
    tile's pages as a [block_n // page_size] vector and reshaping the addresses was tried: the
    reshape hides the rows' 16-byte alignment from Triton, which then does not software-pipeline
    the loads (no cp.async; checked by compiling for sm_90 on the CPU);
  * small grids (few sequences, long contexts) split the KV range over ``num_splits`` programs
    (flash-decoding) whose partials ``_combine_kernel`` merges.

``plan()`` picks the knobs from the static shapes (every one can be overridden per call, so a
benchmark can sweep them) and ``launch()`` runs the kernels through any ``call`` (jax_triton on
a GPU; torch tensors under ``TRITON_INTERPRET=1`` in the CPU tests).
"""

from __future__ import annotations

import dataclasses
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
_LN2 = tl.constexpr(0.6931471805599453)
SPLIT_WAVES = 4       # split-K (only for grids under one program per SM) aims at this many
MIN_SPLIT_TILES = 4   # programs per SM, with at least this many KV tiles in each split
MAX_SPLITS = 64


@triton.jit
def _tile(q, acc, l_i, m_i, kv_ptr, pages_ptr, start, k_lo, k_hi, q_pos, h, scale_log2,
          soft_cap, HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, P: tl.constexpr,
          BLOCK_N: tl.constexpr, PAGE_MODE: tl.constexpr, MASKED: tl.constexpr,
          WINDOW: tl.constexpr, HAS_CAP: tl.constexpr):
    """One K/V tile of keys [start, start + BLOCK_N) folded into the online softmax."""
    ROW: tl.constexpr = 2 * HKV * D                   # elements between two KV slots
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    k_pos = start + n                                 # [BN]
    if PAGE_MODE == 2:                                # the tile lies inside one page
        page = tl.load(pages_ptr + start // PS).to(tl.int64)
        base = page * (PS * ROW) + (start % PS + n) * ROW
    else:                                             # any page size: row by row
        page = tl.load(pages_ptr + k_pos // PS, mask=k_pos < k_hi, other=0).to(tl.int64)
        base = page * (PS * ROW) + (k_pos % PS) * ROW
    base = base + 2 * h * D                           # K of kv head h; V follows at + D
    if MASKED:
        ld_ok = (k_pos >= k_lo) & (k_pos < k_hi)
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=ld_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + base[:, None] + D + d[None, :], mask=ld_ok[:, None], other=0.0)
    else:
        k = tl.load(kv_ptr + base[:, None] + d[None, :])
        v = tl.load(kv_ptr + base[:, None] + D + d[None, :])
    k = k.to(q.dtype)                                 # k: [BN, D]
    v = v.to(q.dtype)                                 # v: [BN, D]
    s = tl.dot(q, tl.trans(k))                        # s: [BM, BN] raw q.k
    scale = scale_log2                                # scores in log2 units = s * scale
    if HAS_CAP:
        # soft_cap * tanh(x / soft_cap), x = q.k * sm_scale; kept in log2 units.
        x = s * (scale_log2 * _LN2) / soft_cap
        s = soft_cap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (1.0 / _LN2)
        scale = 1.0
    if MASKED:
        mask = ld_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(mask, s, _NEG_INF)
    # The scale (> 0) goes on the row max, and into one FMA per score below.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
    m_safe = m_new                                    # unmasked: every score finite
    if MASKED:                                        # a row may have seen no key yet
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
    p = tl.exp2(s * scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _rpa_kernel(
    q_ptr, kv_ptr, kv_lens_ptr, page_idx_ptr, cu_ptr, num_seqs_ptr,
    scale_log2,                       # f32: sm_scale * k_scale * log2(e)
    soft_cap,                         # f32 (unused unless HAS_CAP)
    out_scale,                        # f32: v_scale (unused with splits: the combine applies it)
    out_ptr, m_ptr, l_ptr,            # outputs (jax_triton appends them after the inputs)
    T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    PS: tl.constexpr, P: tl.constexpr, S: tl.constexpr, G: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
    PAGE_MODE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    n_seqs = tl.minimum(tl.load(num_seqs_ptr), S)
    # Sequence of block b: the last i < n_seqs with cu[i] // BLOCK_Q + i <= b.
    lo_i = n_seqs * 0
    hi_i = n_seqs
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if tl.load(cu_ptr + mid) // BLOCK_Q + mid <= b:
            lo_i = mid + 1
        else:
            hi_i = mid
    seq = lo_i - 1
    if seq < 0:
        return
    cu0 = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - cu0
    q0 = (b - cu0 // BLOCK_Q - seq) * BLOCK_Q          # first token of the block inside seq
    if q0 >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = q0 + rows // G                               # [BM] token offset in seq
    head = h * G + rows % G                            # [BM] q head
    row_ok = (tok < q_len) & (rows < BLOCK_Q * G)
    q_pos = kv_len - q_len + tok                       # [BM] absolute position
    d = tl.arange(0, D)
    q_off = (cu0 + tok).to(tl.int64)[:, None] * (HQ * D) + head[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)   # q: [BM, D]

    # Keys this block can see: [k_lo, hi); loops start BLOCK_N-aligned at lo.
    first_pos = kv_len - q_len + q0
    hi = kv_len - q_len + tl.minimum(q0 + BLOCK_Q, q_len)
    k_lo = 0
    if WINDOW > 0:
        k_lo = tl.maximum(first_pos - WINDOW + 1, 0)
    lo = (k_lo // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + sp * chunk
        hi = tl.minimum(hi, lo + chunk)
    # Keys < first_pos + 1 are visible to every row: no mask (none at all with a window).
    mid = lo
    if WINDOW == 0:
        mid = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N

    pages_ptr = page_idx_ptr + seq * P
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(lo, mid, BLOCK_N):
        acc, l_i, m_i = _tile(q, acc, l_i, m_i, kv_ptr, pages_ptr, start, k_lo, hi, q_pos, h,
                              scale_log2, soft_cap, HKV, D, PS, P, BLOCK_N, PAGE_MODE, False,
                              WINDOW, HAS_CAP)
    for start in range(mid, hi, BLOCK_N):
        acc, l_i, m_i = _tile(q, acc, l_i, m_i, kv_ptr, pages_ptr, start, k_lo, hi, q_pos, h,
                              scale_log2, soft_cap, HKV, D, PS, P, BLOCK_N, PAGE_MODE, True,
                              WINDOW, HAS_CAP)

    o_rows = (cu0 + tok).to(tl.int64) * HQ + head      # [BM] flat (token, head) row
    if NUM_SPLITS == 1:
        out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        o_off = o_rows[:, None] * D + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = sp.to(tl.int64) * (T * HQ) + o_rows      # [BM]
        tl.store(out_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + part, m_i, mask=row_ok)        # log2 units
        tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, cu_ptr, num_seqs_ptr, out_scale, out_ptr,
                    T: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Flash-decoding combine of one (token, q head): merges the splits' softmax partials;
    padding tokens (past cu_q_lens[num_seqs]) get zeros."""
    t = tl.program_id(0)
    hq = tl.program_id(1)
    n_tok = tl.load(cu_ptr + tl.minimum(tl.load(num_seqs_ptr), S))
    sp = tl.arange(0, BLOCK_S)
    ok = (sp < NUM_SPLITS) & (t < n_tok)
    row = sp.to(tl.int64) * (T * HQ) + t * HQ + hq     # [BS]
    m = tl.load(m_ptr + row, mask=ok, other=_NEG_INF)
    l = tl.load(l_ptr + row, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == _NEG_INF, 0.0, m_max)
    w = tl.where(m == _NEG_INF, 0.0, tl.exp2(m - m_safe))          # [BS]
    l_tot = tl.sum(w * l, axis=0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) * (out_scale / tl.where(l_tot == 0.0, 1.0, l_tot))
    tl.store(out_ptr + (t * HQ + hq).to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static launch plan (every field a tuning knob of ``ragged_paged_attention_triton``)."""
    block_m: int        # rows of a program: block_q tokens x group q heads
    block_n: int        # keys per K/V tile
    num_splits: int     # KV splits per block (1: no combine kernel)
    num_warps: int
    num_stages: int     # software-pipelining depth of the K/V loads
    page_mode: int      # 0 row-by-row page lookup, 2 one page per tile
    block_q: int        # query tokens per program
    num_blocks: int     # grid axis 0: T // block_q + S (surplus blocks exit at once)


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 132) or 132)
    except Exception:  # pragma: no cover - no device
        return 132


def plan(t: int, s: int, pages_per_seq: int, page_size: int, hq: int, hkv: int, d: int, *,
         block_m: int | None = None, block_n: int | None = None, num_splits: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None,
         page_mode: int | None = None, num_sms: int | None = None) -> Plan:
    """Picks the knobs left as None from the static shapes; ValueError for a knob out of range.

    Decode-like batches (T <= 2 S): 16-row blocks (or the GQA group), 128-key tiles, 4 stages
    (run 2: 73% vs 40% of copy on Qwen b32 x 8k with 64-key tiles; session 3's sweep: 4 stages
    beat 3 on the small grids). Prefill (T >= 64 S): 128-row blocks, 4 warps (session 3: 51% vs
    46% of the matmul rate on Qwen 1 x 8k against 8 warps), 64-key tiles, 3 stages. In between
    (mixed batches, mostly decodes by count): 64-row blocks, 4 warps, so the decodes among them
    do not pay for 128-row tiles. Split-K only when the grid has fewer programs than SMs
    (session 3: Llama b32 x 1k, 256 programs, ran 76% of copy unsplit vs 54% in 2 splits),
    aiming at ``SPLIT_WAVES`` programs per SM with >= ``MIN_SPLIT_TILES`` tiles of keys each.
    """
    group = hq // hkv
    min_m = max(16, 1 << max(0, math.ceil(math.log2(group))))
    per_seq = t / s                       # static tokens per sequence: the batch's kind
    decode, prefill = per_seq <= 2, per_seq >= 64
    bm = block_m or max(min_m, 16 if decode else 128 if prefill and d <= 128 else 64)
    bn = block_n or (128 if decode and d <= 128 else 64)
    if not _pow2(bm) or bm < min_m:
        raise ValueError(f"block_m: must be a power of two >= max(16, group={group}), got {bm}")
    if not _pow2(bn) or bn < 16:
        raise ValueError(f"block_n: must be a power of two >= 16, got {bn}")
    warps = num_warps or (8 if bm >= 256 else 4)   # H100 sweep (session 3): 4 beat 8 at 128 rows
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: must be one of 1, 2, 4, 8, 16, got {warps}")
    stages = num_stages or (4 if decode else 3)
    if not 1 <= stages <= 6:
        raise ValueError(f"num_stages: must be in [1, 6], got {stages}")
    mode = (2 if page_size % bn == 0 else 0) if page_mode is None else page_mode
    if mode not in (0, 2) or (mode == 2 and page_size % bn):
        raise ValueError(f"page_mode: must be 0 or 2 (page_size % block_n == 0); got {mode} for "
                         f"block_n={bn}, page_size={page_size}")
    block_q = bm // group
    nb_real = gpu_common.num_q_blocks(t, s, block_q)  # tight bound: sizes the split heuristic
    if num_splits is None:
        work, sms = nb_real * hkv, num_sms or _num_sms()
        max_kv = pages_per_seq * page_size
        splits = 1
        if work < sms:
            splits = min(-(-SPLIT_WAVES * sms // work), max(1, max_kv // (MIN_SPLIT_TILES * bn)),
                         MAX_SPLITS)
        while splits > 1 and splits * t * hq * d * 4 > (256 << 20):   # partials <= 256 MiB
            splits //= 2
        num_splits = max(splits, 1)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits: must be in [1, 256], got {num_splits}")
    return Plan(bm, bn, num_splits, warps, stages, mode, block_q, t // block_q + s)


def launch(call, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
           sliding_window: int | None = None, soft_cap: float | None = None,
           k_scale: float | None = None, v_scale: float | None = None, **knobs):
    """Runs the kernels through ``call(kernel, inputs, out_specs, grid, num_warps, num_stages,
    zeroed, **constexprs)`` -> outputs, where ``out_specs`` are (shape, dtype) pairs and
    ``zeroed`` asks for the first output zero-filled. Returns ``[T, Hq, D]`` in q's dtype."""
    t, hq, d = q.shape
    _, ps, hc, _ = kv_pages.shape
    hkv = hc // 2
    s, p = page_indices.shape
    pl = plan(t, s, p, ps, hq, hkv, d, **knobs)
    scale_log2 = np.float32(sm_scale * (k_scale if k_scale is not None else 1.0) * _LOG2E)
    out_scale = np.float32(v_scale if v_scale is not None else 1.0)
    meta = kernel_meta(pl, t, s, p, ps, hq, hkv, d, sliding_window, soft_cap is not None)
    inputs = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
              scale_log2, np.float32(soft_cap or 1.0), out_scale)
    grid = (pl.num_blocks, hkv, pl.num_splits)
    if pl.num_splits == 1:
        # Padding tokens belong to no block: zero-filled, so they read as 0.
        specs = (((t, hq, d), q.dtype), ((1,), jnp.float32), ((1,), jnp.float32))
        return call(_rpa_kernel, inputs, specs, grid, pl.num_warps, pl.num_stages, True,
                    **meta)[0]
    ns = pl.num_splits
    specs = (((ns, t, hq, d), jnp.float32), ((ns, t, hq), jnp.float32),
             ((ns, t, hq), jnp.float32))
    acc, m, l = call(_rpa_kernel, inputs, specs, grid, pl.num_warps, pl.num_stages, False,
                     **meta)
    return call(_combine_kernel, (acc, m, l, cu_q_lens, num_seqs, out_scale),
                (((t, hq, d), q.dtype),), (t, hq), 4 if d >= 128 else 2, 1, False,
                T=t, HQ=hq, D=d, S=s, NUM_SPLITS=ns,
                BLOCK_S=max(2, triton.next_power_of_2(ns)))[0]


def kernel_meta(pl: Plan, t: int, s: int, pages_per_seq: int, page_size: int, hq: int, hkv: int,
                d: int, sliding_window: int | None = None, has_cap: bool = False) -> dict:
    """``_rpa_kernel``'s constexpr arguments for a plan."""
    return dict(T=t, HQ=hq, HKV=hkv, D=d, PS=page_size, P=pages_per_seq, S=s, G=hq // hkv,
                BLOCK_Q=pl.block_q, BLOCK_M=pl.block_m, BLOCK_N=pl.block_n,
                NUM_SPLITS=pl.num_splits, WINDOW=sliding_window or 0, HAS_CAP=has_cap,
                PAGE_MODE=pl.page_mode)


def compile_stats(t: int, s: int, pages_per_seq: int, page_size: int, hq: int, hkv: int, d: int,
                  *, dtype: str = "bf16", kv_dtype: str | None = None, arch: int = 90,
                  **knobs) -> dict:
    """Compiles ``_rpa_kernel`` for CUDA ``sm_<arch>`` without a GPU (Triton's bundled ptxas)
    and returns the plan with shared memory, registers, spilled bytes and ``pipelined`` (the
    K/V loads became cp.async copies, i.e. Triton software-pipelined the loop); with splits,
    the combine kernel is compiled too. Pointers are declared 16-byte aligned, as jax_triton
    does. Not with ``TRITON_INTERPRET=1``."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    pl = plan(t, s, pages_per_seq, page_size, hq, hkv, d, num_sms=132, **knobs)
    meta = kernel_meta(pl, t, s, pages_per_seq, page_size, hq, hkv, d)
    out = dtype if pl.num_splits == 1 else "fp32"
    sig = dict(q_ptr=f"*{dtype}", kv_ptr=f"*{kv_dtype or dtype}", kv_lens_ptr="*i32",
               page_idx_ptr="*i32", cu_ptr="*i32", num_seqs_ptr="*i32", scale_log2="fp32",
               soft_cap="fp32", out_scale="fp32", out_ptr=f"*{out}", m_ptr="*fp32",
               l_ptr="*fp32", **{k: "constexpr" for k in meta})
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v[0] == "*"}
    ck = triton.compile(ASTSource(_rpa_kernel, sig, constexprs=meta, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=pl.num_warps, num_stages=pl.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ck.asm["ptx"])
        f.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", f.name,
                              "-o", "/dev/null"], capture_output=True, text=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    combine_shared = None
    if pl.num_splits > 1:       # the combine kernel must compile too
        cmeta = dict(T=t, HQ=hq, D=d, S=s, NUM_SPLITS=pl.num_splits,
                     BLOCK_S=max(2, triton.next_power_of_2(pl.num_splits)))
        csig = dict(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", cu_ptr="*i32",
                    num_seqs_ptr="*i32", out_scale="fp32", out_ptr=f"*{dtype}",
                    **{k: "constexpr" for k in cmeta})
        cattrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(csig.values())
                  if v[0] == "*"}
        combine_shared = triton.compile(
            ASTSource(_combine_kernel, csig, constexprs=cmeta, attrs=cattrs),
            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4)).metadata.shared
    return dict(plan=dataclasses.asdict(pl), shared=ck.metadata.shared,
                combine_shared=combine_shared,
                regs=num(r"Used (\d+) registers"), spill_bytes=num(r"(\d+) bytes spill stores"),
                pipelined=ck.asm["ttgir"].count("async_copy_global_to_local") > 0)


def _jax_triton_call(kernel, inputs, specs, grid, num_warps, num_stages, zeroed, **meta):
    import jax_triton as jt  # lazy: only on GPU hosts

    shapes = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in specs)
    # Scalars sit between the array inputs and the outputs, in kernel argument order.
    return jt.triton_call(*inputs, kernel=kernel, out_shape=shapes, grid=grid,
                          num_warps=num_warps, num_stages=num_stages,
                          zeroed_outputs=(0,) if zeroed else (), **meta)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "interpret", "block_m", "block_n",
                                             "num_splits", "num_warps", "num_stages",
                                             "page_mode"))
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
    num_warps: int | None = None,
    num_stages: int | None = None,
    page_mode: int | None = None,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Ragged paged attention (contract of ``pallas_kernels.ragged_paged_attention``) in Triton.

    ``block_m`` / ``block_n`` / ``num_splits`` / ``num_warps`` / ``num_stages`` / ``page_mode``
    are tuning knobs (see ``plan``); None picks them from the static shapes. ``interpret`` is
    not supported through JAX (the CPU tests run the kernels in Triton's own interpreter).
    """
    if interpret:
        raise ValueError("interpret: the Triton backend runs on GPUs only; use backend='reference'")
    gpu_common.check_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                            sliding_window, soft_cap)
    i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    return launch(_jax_triton_call, q, kv_pages, i32(kv_lens), i32(page_indices), i32(cu_q_lens),
                  i32(num_seqs), sm_scale=sm_scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, block_m=block_m,
                  block_n=block_n, num_splits=num_splits, num_warps=num_warps,
                  num_stages=num_stages, page_mode=page_mode)
