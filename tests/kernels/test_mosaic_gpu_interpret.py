"""Mosaic GPU ragged paged attention on a CPU: the GPU interpreter and lowering for CUDA.

1. ``interpret=True`` runs the kernel in Pallas' Mosaic GPU interpreter (wgmma becomes
   ``jnp.dot``, so 0 * NaN is NaN there as on the H100). Every slot a query cannot see holds NaN:
   pages no sequence owns, the tail of each partly used page, slots before a sliding window, and
   the padding rows of q (``build`` of the shared kernel test). The result must be NaN-free and
   match the reference computed on the clean cache.
2. ``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs Mosaic GPU's lowering (and
   layout inference) without a GPU, in both Lane and Warpgroup semantics, so most compile errors
   show up here before a device run.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import gpu_mosaic, gpu_mosaic_ws
from tests.kernels.test_ragged_paged_attention import Case, build, truths

NAN = float("nan")
REL_TOL = 1e-2     # ||out - ref|| / ||ref|| for bf16 inputs
ELEM_TOL = 3e-2    # element-wise atol = rtol, as the shared kernel test uses for bf16


def _bf16(batch, page_size, head_dim, gqa, **kw) -> Case:
    return Case(batch, page_size, head_dim, gqa, q_dtype="bfloat16", kv_dtype="bfloat16", **kw)


# (case, kernel knobs): decode / prefill / mixed / chunked / padded sequences, page sizes 16 and
# 64, GQA 1 and 4, sliding windows (pre-window slots inside the first tile), a soft cap, forced
# KV splits (the flash-decoding combine) and 128-key tiles.
CASES = [
    (_bf16("decode", 16, 128, 4), {}),
    (_bf16("prefill", 16, 64, 1), {}),
    (_bf16("mixed", 64, 128, 4), {}),
    (_bf16("chunked_long_context", 64, 64, 1), {}),
    (_bf16("few_real_seqs", 16, 64, 4), {}),
    (_bf16("mixed", 16, 64, 4, sliding_window=5), {}),
    (_bf16("chunked_long_context", 16, 128, 1, sliding_window=40), {}),
    (_bf16("decode", 64, 64, 4, sliding_window=24, soft_cap=3.0), {}),
    (_bf16("chunked_long_context", 16, 64, 4, sliding_window=70), dict(num_splits=3)),
    (_bf16("decode", 16, 64, 1), dict(num_splits=2, block_n=128)),
]
IDS = [c.id.replace("-q_dtype=bfloat16-kv_dtype=bfloat16", "") +
       "".join(f"-{k}={v}" for k, v in kn.items()) for c, kn in CASES]


@functools.lru_cache(maxsize=None)
def _kernel(lowering: str | None, kwargs: tuple, ws: bool = False):
    fn = (gpu_mosaic_ws.ragged_paged_attention_mosaic_gpu_ws if ws else
          gpu_mosaic.ragged_paged_attention_mosaic_gpu)
    return jax.jit(functools.partial(fn, lowering=lowering, **dict(kwargs)))


def _run(case: Case, knobs: dict, *, interpret: bool, lowering: str | None = None,
         ws: bool = False):
    args, clean, poisoned, kwargs, n_tok = build(case, NAN)
    q, kv_lens, page_indices, cu, num_seqs = args
    fn = _kernel(lowering, tuple(sorted({**kwargs, **knobs, "interpret": interpret}.items())), ws)
    return fn, (q, poisoned, kv_lens, page_indices, cu, num_seqs), n_tok


@pytest.mark.parametrize("case,knobs", CASES, ids=IDS)
def test_interpret_matches_reference_with_nan_in_invisible_slots(case, knobs):
    fn, args, n_tok = _run(case, knobs, interpret=True)
    kv = np.asarray(args[1], np.float32)
    assert np.isnan(kv).any(), "the poisoned cache must hold NaN"
    out = fn(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    out = np.asarray(out[:n_tok], np.float32)
    ref, _ = truths(case, 0, False)
    assert np.isfinite(out).all(), "NaN from slots the queries cannot see leaked into the output"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < REL_TOL, f"relative error {rel:.2e}"
    np.testing.assert_allclose(out, ref, atol=ELEM_TOL, rtol=ELEM_TOL)


# The warp-specialized kernel (3 warpgroups, cross-warpgroup barriers) hangs in the GPU
# interpreter on this 2-core CI host (a thread that never starts; a 3-thread toy kernel runs),
# so it is checked by lowering only, on every case (no split-K knob there).
WS_CASES = [(c, {k: v for k, v in kn.items() if k != "num_splits"}) for c, kn in CASES]


@pytest.mark.parametrize("lowering", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("ws", [False, True], ids=["plain", "ws"])
@pytest.mark.parametrize("idx", range(len(CASES)), ids=IDS)
def test_lowers_for_cuda(idx, ws, lowering):
    """Mosaic GPU lowering + layout inference for sm_90 run on the CPU (no GPU needed)."""
    case, knobs = (WS_CASES if ws else CASES)[idx]
    fn, args, _ = _run(case, knobs, interpret=False, lowering=lowering, ws=ws)
    try:
        lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001 - only a missing CUDA lowering path is a skip
        if "cuda" in str(e).lower() and "platform" in str(e).lower() and "register" in str(e):
            pytest.skip(f"this jax build cannot lower for cuda: {e}")
        raise
    assert "mosaic_gpu" in lowered.as_text()


def test_block_knob_changes_the_result_only_within_rounding():
    """block_n / num_splits are performance knobs: same answer (to bf16 rounding) either way."""
    case, _ = CASES[0]
    outs = []
    for knobs in ({}, dict(block_n=128, num_splits=2), dict(num_splits=4, stages=2)):
        fn, args, n_tok = _run(case, knobs, interpret=True)
        outs.append(np.asarray(fn(*args)[:n_tok], np.float32))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=ELEM_TOL, rtol=ELEM_TOL)


@pytest.mark.parametrize("field,kw,match", [
    ("page_size", dict(page_size=48), "kv_pages: page_size"),
    ("block_n", dict(block_n=96), "block_n:"),
    ("block_n", dict(block_n=32), "block_n:"),
    ("num_splits", dict(num_splits=0), "num_splits:"),
    ("stages", dict(stages=0), "stages:"),
    ("stages", dict(stages=4, block_n=256), "stages:"),   # shared memory
    ("num_splits", dict(num_splits=2, ws=True), "num_splits:"),
])
def test_invalid_knobs_raise_naming_the_field(field, kw, match):
    case = dataclasses.replace(CASES[0][0], page_size=kw.pop("page_size", 16))
    args, clean, _, kwargs, _ = build(case, NAN) if case.page_size != 48 else (None,) * 5
    if args is None:   # 48-slot pages: build the arrays by hand (build's layout needs 16/32/64)
        import jax.numpy as jnp
        args = (jnp.zeros((4, 8, 64), jnp.bfloat16), jnp.zeros((4,), jnp.int32),
                jnp.zeros((4, 2), jnp.int32), jnp.zeros((5,), jnp.int32),
                jnp.ones((1,), jnp.int32))
        clean = jnp.zeros((8, 48, 4, 64), jnp.bfloat16)
        kwargs = dict(sm_scale=0.125)
    q, kv_lens, page_indices, cu, num_seqs = args
    fn = (gpu_mosaic_ws.ragged_paged_attention_mosaic_gpu_ws if kw.pop("ws", False) else
          gpu_mosaic.ragged_paged_attention_mosaic_gpu)
    with pytest.raises(ValueError, match=f"^{match}"):
        fn(q, clean, kv_lens, page_indices, cu, num_seqs, interpret=True, **kwargs, **kw)


@pytest.mark.parametrize("work,kv_tiles", [(4, 512), (8, 512), (140, 16), (264, 128), (2144, 16),
                                           (1, 3)])
def test_pick_splits_fills_waves_without_tiny_splits(work, kv_tiles):
    sms = 132
    ns = gpu_mosaic._pick_splits(work, kv_tiles, partial_bytes=1 << 20, num_sms=sms)
    assert 1 <= ns <= gpu_mosaic.MAX_SPLITS
    if ns > 1:   # each split keeps enough tiles, and splitting stops at ~SPLIT_WAVES waves
        assert kv_tiles // ns >= gpu_mosaic.MIN_SPLIT_TILES
        assert work * (ns - 1) < gpu_mosaic.SPLIT_WAVES * sms
    if work >= gpu_mosaic.SPLIT_WAVES * sms or kv_tiles < 2 * gpu_mosaic.MIN_SPLIT_TILES:
        assert ns == 1
    elif ns < gpu_mosaic.MAX_SPLITS:   # uncapped: the grid reaches the wave target or tiles ran out
        assert (work * ns >= gpu_mosaic.SPLIT_WAVES * sms
                or kv_tiles // (ns + 1) < gpu_mosaic.MIN_SPLIT_TILES)


def test_kernel_from_name_binds_knobs_and_rejects_unknown_ones():
    fn = gpu_mosaic.kernel_from_name("mosaic_gpu_lane:bn128:s2:sp16")
    assert fn.keywords == dict(lowering="Lane", block_n=128, stages=2, num_splits=16)
    assert gpu_mosaic.kernel_from_name("mosaic_gpu").keywords == dict(lowering=None)
    ws = gpu_mosaic.kernel_from_name("mosaic_gpu_ws_wg:s3")
    assert ws.func is gpu_mosaic_ws.ragged_paged_attention_mosaic_gpu_ws
    assert ws.keywords == dict(lowering="Warpgroup", stages=3)
    for bad in ("mosaic_gpu:q3", "mosaic_gpu_fast", "triton", "mosaic_gpu:bn",
                "mosaic_gpu:bn64,s2"):
        with pytest.raises(ValueError, match="^backend:"):
            gpu_mosaic.kernel_from_name(bad)


@pytest.mark.skipif(os.environ.get("JAXLLM_WS_INTERPRET") != "1",
                    reason="the 3-warpgroup kernel hangs in the GPU interpreter on the 2-core CI "
                           "host (one kernel thread never starts: likely XLA CPU worker "
                           "starvation); opt in with JAXLLM_WS_INTERPRET=1 on a bigger host")
@pytest.mark.parametrize("case,knobs", WS_CASES[:3], ids=IDS[:3])
def test_ws_interpret_matches_reference(case, knobs):
    """Opt-in: never completed on the 2-core CI host (see the skip reason)."""
    fn, args, n_tok = _run(case, knobs, interpret=True, ws=True)
    out = np.asarray(fn(*args)[:n_tok], np.float32)
    ref, _ = truths(case, 0, False)
    assert np.isfinite(out).all(), "NaN from slots the queries cannot see leaked into the output"
    np.testing.assert_allclose(out, ref, atol=ELEM_TOL, rtol=ELEM_TOL)
