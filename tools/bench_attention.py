"""Benchmark of the GPU ragged paged attention kernels (one script, one device call).

Measures the two ceilings first (device copy bandwidth, bf16 matmul rate), then for the
Llama-3.1-8B (32 q / 8 kv heads, d=128) and Qwen2.5-7B (28/4/128) attention shapes in bf16:
  * decode (q_len 1), batch 1/32/256 x context 1k/8k/32k: KV bytes read / time and its fraction
    of the copy bandwidth;
  * prefill 1x8k and 16x512 (causal): TFLOP/s and fraction of the matmul rate;
  * mixed batch (200 decodes at 4k context + one 2k prefill) vs the sum of the parts;
side by side with JAX's Pallas Triton paged_attention (decode), JAX's attention_mgpu (dense
causal prefill) and the XLA gather+dot reference (where it fits in memory).

``--backends`` takes any kernel name the dispatch knows (``pallas_kernels.ragged_paged_attention
.BACKENDS``), plus ``mosaic_gpu_lane`` / ``mosaic_gpu_wg`` for Mosaic GPU's two lowering
semantics. ``--sweep`` also times, on the cases that missed their targets, a few tuning knob
sets per backend (``SWEEP``: Triton block/stage/warp/split configs, Mosaic GPU splits/stages;
only the knobs a kernel accepts) and marks the fastest row of each case and backend ``best``.

Timing: jit, 2 warm-ups (the first one's time is reported as ``compile_s``), then ``reps``
repetitions of ``inner`` back-to-back calls (rotating over several input copies when one is
smaller than L2) closed by block_until_ready; the median per-call time is reported ("host
loop": includes JAX's dispatch). Cases under ``--device-loop-under-us`` (default 300 us) are
also timed as n calls inside ONE jitted fori_loop ("device loop": dispatch paid once per n),
and ``us`` is the smaller of the two. Page size 16, pages in random order. ``--budget-s`` caps
the run: cases left when it runs out are recorded as skipped; the JSON is rewritten after every
row, so a run cut short still leaves its results.

    python3 tools/bench_attention.py --out $OUT [--quick] [--sweep] [--budget-s 400]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention  # noqa: E402

MODELS = {"llama3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}
PAGE = 16
L2_BYTES = 50 << 20
DEVICE_LOOP_UNDER_US = 300.0   # also time in a device loop when the host loop is faster than this
DEADLINE = float("inf")        # time.monotonic() past which cases are skipped (--budget-s)
OUT_JSON = None                # rewritten after every row
STATE = {}                     # info, ceilings: written with the rows
# Knob sets timed by --sweep on the SWEEP_CASES, per backend and kind (decode/prefill); each
# kernel gets only the knobs its signature takes. "splits*" scale the plan's own split count.
SWEEP = {
    "triton": {
        "decode": [dict(), dict(block_n=64, num_stages=2), dict(block_n=64, num_stages=4),
                   dict(block_n=128, num_stages=4), dict(num_warps=8),
                   dict(splits_x=0.5), dict(splits_x=2),
                   # small grids (b1 x 32k, b32 x 1k): more, shorter splits; 2 CTAs per SM
                   dict(block_n=64, num_stages=4, splits_x=2),
                   dict(block_n=64, num_stages=4, splits_x=4),
                   dict(block_n=32, num_stages=4, splits_x=2),
                   dict(block_n=64, num_stages=3, num_warps=2, splits_x=2)],
        "prefill": [dict(), dict(block_m=64, block_n=64, num_warps=4), dict(block_n=128, num_stages=2),
                    dict(block_n=128, num_stages=3), dict(num_stages=4),
                    dict(num_warps=4), dict(block_m=64, block_n=128, num_warps=4),
                    dict(num_stages=2), dict(block_n=32, num_stages=4)],
    },
    "mosaic_gpu": {
        "decode": [dict(num_splits=4), dict(num_splits=16), dict(stages=2), dict(stages=4)],
        "prefill": [dict(stages=2), dict(stages=4), dict(block_n=128)],
    },
}
# Most telling first (the sweep runs in this order until --budget-s runs out).
SWEEP_CASES = [("qwen2.5-7b", "decode", 32, 8192), ("llama3.1-8b", "decode", 32, 1024),
               ("llama3.1-8b", "prefill", 1, 8192),
               ("llama3.1-8b", "decode", 32, 8192),    # run 2: bn128 s3 79% vs bn64 s2 86%
               ("qwen2.5-7b", "decode", 1, 32768),
               ("llama3.1-8b", "prefill", 16, 512), ("qwen2.5-7b", "decode", 256, 1024),
               ("llama3.1-8b", "decode", 1, 32768)]


def timeit(fn, arg_sets, reps=20, target_s=0.02, first=None) -> float:
    """Median seconds per call of fn over rotating arg sets (see module docstring); the first
    warm-up's seconds (compile included) go to ``first["compile_s"]``."""
    for i, a in enumerate(arg_sets[:2]):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        if i == 0 and first is not None:
            first["compile_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    est = max(time.perf_counter() - t0, 1e-6)
    inner = max(len(arg_sets), min(200, int(target_s / est)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def timeit_device_loop(fn, arg_sets, n=16, reps=10) -> float:
    """Median seconds per call with n calls inside ONE jitted fori_loop (a distinct q per
    iteration, so nothing is hoisted): host dispatch is paid once per n calls, so this is
    close to device time for small cases, where the host-loop timing is dispatch-bound."""
    q0, *rest = arg_sets[0]
    qs = q0[None] * (1.0 + 0.01 * jnp.arange(n, dtype=jnp.float32)).astype(q0.dtype).reshape(
        (n,) + (1,) * q0.ndim)

    @jax.jit
    def looped(qs, *rest):
        def body(i, acc):
            o = fn(qs[i], *rest)
            return acc + o.reshape(-1)[0].astype(jnp.float32)
        return lax.fori_loop(0, n, body, jnp.float32(0))

    jax.block_until_ready(looped(qs, *rest))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(looped(qs, *rest))
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def ceilings() -> dict:
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    neg = jax.jit(lambda a: -a)
    t = timeit(neg, [(x,)], reps=10)
    copy_bw = 2 * x.nbytes / t
    del x
    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    t = timeit(mm, [(a, b)], reps=10)
    return dict(copy_bw=copy_bw, matmul_flops=2 * n ** 3 / t)


def random_pages(num_pages: int, hkv: int, d: int, seed: int) -> jax.Array:
    """bf16 [num_pages, PAGE, 2*hkv, d] of random values (a random base block tiled: distinct
    addresses, so no cache reuse; never zeros)."""
    base_pages = math.gcd(num_pages, 2048)      # divides num_pages: no slice copy
    reps = num_pages // base_pages

    @jax.jit
    def make(key):
        base = jax.random.normal(key, (base_pages, PAGE, 2 * hkv, d), jnp.bfloat16)
        return jnp.tile(base, (reps, 1, 1, 1))
    return make(jax.random.key(seed))


def ragged_inputs(q_lens, kv_lens, hq, hkv, d, seed=0, copies=1):
    """Arg sets (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs) for our contract."""
    rng = np.random.default_rng(seed)
    s = len(q_lens)
    pps = max(-(-k // PAGE) for k in kv_lens)
    num_pages = s * pps
    sets = []
    for c in range(copies):
        pi = rng.permutation(num_pages).astype(np.int32).reshape(s, pps)
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        q = jax.random.normal(jax.random.key(100 + c), (int(cu[-1]), hq, d), jnp.bfloat16)
        kv = random_pages(num_pages, hkv, d, seed + c)
        sets.append((q, kv, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(pi), jnp.asarray(cu),
                     jnp.asarray([s], jnp.int32)))
    return sets


def kv_bytes(kv_lens, hkv, d) -> int:
    return int(sum(kv_lens)) * 2 * hkv * d * 2


def causal_flops(q_lens, kv_lens, hq, d) -> float:
    pairs = sum(q * (k - q) + q * (q + 1) / 2 for q, k in zip(q_lens, kv_lens))
    return 4.0 * pairs * hq * d


LOWERINGS = {"_lane": "Lane", "_wg": "Warpgroup"}   # mosaic_gpu_lane / mosaic_gpu_wg


def our_backends(names):
    """name -> kernel function, for any backend the dispatch knows (and <kernel>_lane / _wg:
    Mosaic GPU lowering semantics); unknown or unavailable names are reported and left out."""
    from pallas_kernels.ragged_paged_attention import BACKENDS, load_kernel
    fns = {}
    for n in names:
        base, lowering = n, None
        for suffix, sem in LOWERINGS.items():
            if n.endswith(suffix) and n[:-len(suffix)] in BACKENDS:
                base, lowering = n[:-len(suffix)], sem
        if n.startswith("mosaic_gpu"):   # mosaic_gpu[_ws][_lane|_wg][:bn128][:s3][:sp16]
            try:
                from pallas_kernels.ragged_paged_attention.gpu_mosaic import kernel_from_name
                fns[n] = kernel_from_name(n)
            except Exception as e:
                print(f"backend {n} unavailable: {e!r}", flush=True)
            continue
        try:
            if base in ("auto", "reference") or base not in BACKENDS:
                raise ValueError(f"--backends: {n!r} is not a kernel; known: "
                                 f"{[b for b in BACKENDS if b not in ('auto', 'reference')]}")
            f = load_kernel(base)
            fns[n] = functools.partial(f, lowering=lowering) if lowering else f
        except Exception as e:
            print(f"backend {n} unavailable: {e!r}", flush=True)
    return fns


def accepted(fn, knobs: dict) -> dict | None:
    """``knobs`` if ``fn`` takes every one of them as a keyword, else None."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return knobs if all(k in params for k in knobs) else None


def knob_label(knobs: dict) -> str:
    short = {"block_m": "bm", "block_n": "bn", "num_warps": "w", "num_stages": "s",
             "num_splits": "ns", "stages": "stages", "page_mode": "pm"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in knobs.items()) or "default"


def save():
    if OUT_JSON is not None:
        OUT_JSON.write_text(json.dumps(dict(STATE, results=RESULTS), indent=1))


RESULTS: list = []


def run_case(results, kind, label, fn_name, fn, arg_sets, *, nbytes=None, flops=None,
             reps=20, extra=None):
    row = dict(kind=kind, case=label, backend=fn_name, **(extra or {}))
    if time.monotonic() > DEADLINE:
        row["error"] = "skipped: --budget-s ran out"
        results.append(row)
        save()
        return row
    try:
        t_host = timeit(fn, arg_sets, reps=reps, first=row)
        row["us_host_loop"] = t_host * 1e6
        t = t_host
        if t_host * 1e6 < DEVICE_LOOP_UNDER_US:
            t_dev = timeit_device_loop(fn, arg_sets)
            row["us_dev_loop"] = t_dev * 1e6
            t = min(t_host, t_dev)
        row["us"] = t * 1e6
        if nbytes is not None:
            row["GBps"] = nbytes / t / 1e9
            row["MB"] = nbytes / 1e6
        if flops is not None:
            row["TFLOPs"] = flops / t / 1e12
        ceil = STATE.get("ceilings", {})
        if nbytes is not None and kind == "decode" and "copy_bw" in ceil:
            row["frac_copy"] = nbytes / t / ceil["copy_bw"]
        if flops is not None and kind == "prefill" and "matmul_flops" in ceil:
            row["frac_mm"] = flops / t / ceil["matmul_flops"]
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    results.append(row)
    print(json.dumps(row), flush=True)
    save()
    return row


def triton_plan(q_lens, kv_lens, hq, hkv, d, knobs) -> dict | None:
    """The Triton kernel's launch plan for a case (for the report), or None."""
    try:
        from pallas_kernels.ragged_paged_attention import gpu_triton as gt
        pps = max(-(-k // PAGE) for k in kv_lens)
        return dict(vars(gt.plan(sum(q_lens), len(q_lens), pps, PAGE, hq, hkv, d, **knobs)))
    except Exception as e:  # plan errors show up in the timed call too
        return dict(error=repr(e)[:100])


def sweep_rows(results, kind, label, fns, sets, hq, hkv, d, q_lens, kv_lens, **measure):
    """The SWEEP knob sets of every backend on one case (defaults are the un-suffixed rows)."""
    for name, f in fns.items():
        base = next((b for b in SWEEP if name == b or name.startswith(b + "_")), None)
        for knobs in SWEEP.get(base, {}).get(kind, []):
            knobs = dict(knobs)
            if "splits_x" in knobs:        # relative to the Triton plan's own split count
                auto = (triton_plan(q_lens, kv_lens, hq, hkv, d, {}) or {}).get("num_splits", 1)
                knobs = dict(num_splits=max(1, int(auto * knobs.pop("splits_x"))))
            if accepted(f, knobs) is None:
                continue
            g = jax.jit(functools.partial(f, sm_scale=1 / math.sqrt(d), **knobs))
            extra = dict(sweep=True, knobs=knobs)
            if name == "triton":
                extra["plan"] = triton_plan(q_lens, kv_lens, hq, hkv, d, knobs)
            run_case(results, kind, label, f"{name} {knob_label(knobs)}", g, sets, reps=10,
                     extra=extra, **measure)


def ours(fns, hq, hkv, d, q_lens, kv_lens):
    scale = 1.0 / math.sqrt(d)
    return {n: jax.jit(functools.partial(f, sm_scale=scale)) for n, f in fns.items()}


def plan_extra(name, q_lens, kv_lens, hq, hkv, d) -> dict:
    return dict(plan=triton_plan(q_lens, kv_lens, hq, hkv, d, {})) if name == "triton" else {}


def out_of_budget(results, kind, label) -> bool:
    """Past --budget-s: records the case as skipped (no inputs built) and returns True."""
    if time.monotonic() <= DEADLINE:
        return False
    results.append(dict(kind=kind, case=label, backend="*", error="skipped: --budget-s ran out"))
    print(json.dumps(results[-1]), flush=True)
    save()
    return True


def bench_decode(results, fns, model, batch, ctx, with_baselines, sweep=False):
    hq, hkv, d = MODELS[model]
    kvl = [ctx] * batch
    nbytes = kv_bytes(kvl, hkv, d)
    copies = min(4, max(1, -(-4 * L2_BYTES // nbytes)))
    label = f"{model} decode b{batch} ctx{ctx}"
    if out_of_budget(results, "decode", label):
        return
    sets = ragged_inputs([1] * batch, kvl, hq, hkv, d, copies=copies)
    if sweep:
        sweep_rows(results, "decode", label, fns, sets, hq, hkv, d, [1] * batch, kvl,
                   nbytes=nbytes)
        return
    for n, f in ours(fns, hq, hkv, d, [1] * batch, kvl).items():
        run_case(results, "decode", label, n, f, sets, nbytes=nbytes,
                 extra=plan_extra(n, [1] * batch, kvl, hq, hkv, d))
    if with_baselines and nbytes <= (2 << 30):
        ref = jax.jit(functools.partial(ref_ragged_paged_attention, sm_scale=1 / math.sqrt(d)))
        run_case(results, "decode", label, "xla_ref", ref, sets, nbytes=nbytes)
    del sets
    if with_baselines and nbytes > (12 << 30):
        results.append(dict(kind="decode", case=label, backend="jax_pallas_paged",
                            error="skipped: a second KV layout does not fit in GPU memory"))
    elif with_baselines:
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
        pps = ctx // PAGE
        sets = []
        rng = np.random.default_rng(1)
        for c in range(copies):
            k = random_pages(batch * pps, hkv, d, 7 + c)     # reuse generator, then split K/V
            kp = jnp.transpose(k[:, :, 0::2], (2, 0, 1, 3))  # [hkv, pages, PAGE, d]
            vp = jnp.transpose(k[:, :, 1::2], (2, 0, 1, 3))
            del k
            bt = jnp.asarray(rng.permutation(batch * pps).astype(np.int32).reshape(batch, pps))
            q = jax.random.normal(jax.random.key(c), (batch, hq, d), jnp.bfloat16)
            sets.append((q, kp, vp, bt, jnp.full((batch,), ctx, jnp.int32)))
        ks = max(1, min(16, pps // 8))
        f = jax.jit(functools.partial(jpa.paged_attention, k_splits=ks,
                                      pages_per_compute_block=min(8, pps // ks)))
        run_case(results, "decode", label, "jax_pallas_paged", f, sets, nbytes=nbytes)
        del sets


def bench_prefill(results, fns, model, batch, seqlen, with_baselines, sweep=False):
    hq, hkv, d = MODELS[model]
    ql = [seqlen] * batch
    flops = causal_flops(ql, ql, hq, d)
    label = f"{model} prefill {batch}x{seqlen}"
    if out_of_budget(results, "prefill", label):
        return
    sets = ragged_inputs(ql, ql, hq, hkv, d)
    if sweep:
        sweep_rows(results, "prefill", label, fns, sets, hq, hkv, d, ql, ql, flops=flops)
        return
    for n, f in ours(fns, hq, hkv, d, ql, ql).items():
        run_case(results, "prefill", label, n, f, sets, flops=flops,
                 extra=plan_extra(n, ql, ql, hq, hkv, d))
    del sets
    if with_baselines:
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as am
            cfg = am.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
            ks = jax.random.split(jax.random.key(3), 3)
            # attention_mgpu stages tiles in f16 SMEM: f16 inputs (same bytes and flops).
            q = jax.random.normal(ks[0], (batch, seqlen, hq, d), jnp.float16)
            k = jax.random.normal(ks[1], (batch, seqlen, hkv, d), jnp.float16)
            v = jax.random.normal(ks[2], (batch, seqlen, hkv, d), jnp.float16)
            f = jax.jit(lambda q, k, v: am.attention(q, k, v, cfg))
            run_case(results, "prefill", label, "jax_attention_mgpu(dense)", f, [(q, k, v)],
                     flops=flops)
        except Exception as e:
            results.append(dict(kind="prefill", case=label, backend="jax_attention_mgpu(dense)",
                                error=repr(e)[:300]))


def bench_mixed(results, fns, model):
    hq, hkv, d = MODELS[model]
    dec_q, dec_kv = [1] * 200, [4096] * 200
    pre_q, pre_kv = [2048], [2048]
    parts = {}
    if out_of_budget(results, "mixed", f"{model} mixed"):
        return
    for label, ql, kvl in (("decodes", dec_q, dec_kv), ("prefill", pre_q, pre_kv),
                           ("mixed", dec_q + pre_q, dec_kv + pre_kv)):
        sets = ragged_inputs(ql, kvl, hq, hkv, d)
        for n, f in ours(fns, hq, hkv, d, ql, kvl).items():
            r = run_case(results, "mixed", f"{model} mixed:{label}", n, f, sets,
                         nbytes=kv_bytes(kvl, hkv, d), flops=causal_flops(ql, kvl, hq, d),
                         extra=plan_extra(n, ql, kvl, hq, hkv, d))
            parts[(n, label)] = r.get("us")
        del sets
    for n in fns:
        m, a, b = parts.get((n, "mixed")), parts.get((n, "decodes")), parts.get((n, "prefill"))
        if m and a and b:
            results.append(dict(kind="mixed-ratio", case=f"{model} mixed/(dec+pre)", backend=n,
                                ratio=m / (a + b)))
            print(json.dumps(results[-1]), flush=True)


def markdown(path: str, skip: tuple[str, ...] = ()) -> str:
    """Renders a bench_attention.json as the markdown table used in BENCHMARKS.md, leaving out
    rows whose backend is in ``skip``."""
    data = json.loads(Path(path).read_text())
    data["results"] = [r for r in data["results"] if r["backend"] not in skip]
    c = data["ceilings"]
    lines = [f"Ceilings measured in the same run: copy {c['copy_bw'] / 1e12:.2f} TB/s (read+write), "
             f"bf16 matmul {c['matmul_flops'] / 1e12:.0f} TFLOP/s.", "",
             "| case | backend | time (us) | device-loop (us) | GB/s | % copy | "
             "TFLOP/s | % matmul | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in data["results"]:
        if "ratio" in r:
            lines.append(f"| {r['case']} | {r['backend']} | | | | | | | ratio {r['ratio']:.2f} |")
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['backend']} | | | | | | | {r['error'][:80].replace(chr(10), ' ').replace('|', '/')} |")
            continue
        f = lambda k, fmt: (fmt % r[k]) if k in r else ""  # noqa: E731
        pc = f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else ""
        pm = f"{100 * r['frac_mm']:.0f}%" if "frac_mm" in r else ""
        both = f('us_dev_loop', '%.1f')
        note = "best" if r.get("best") else ""
        lines.append(f"| {r['case']} | {r['backend']} | {r['us']:.1f} | {both} | "
                     f"{f('GBps', '%.0f')} | {pc} | {f('TFLOPs', '%.1f')} | {pm} | {note} |")
    return "\n".join(lines)


def mark_best(results) -> None:
    """Sets ``best`` on the fastest timed row of each (case, backend family) with more than one
    row (a family: a kernel's default row and its sweep rows)."""
    groups = {}
    for r in results:
        if "us" in r and "error" not in r:
            groups.setdefault((r["case"], r["backend"].split(" ")[0]), []).append(r)
    for rows in groups.values():
        for r in rows:
            r.pop("best", None)
        if len(rows) > 1:
            min(rows, key=lambda r: r["us"])["best"] = True


def print_table(results, ceil) -> None:
    print(f"\ncopy {ceil['copy_bw'] / 1e12:.2f} TB/s   "
          f"matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s")
    print(f"{'case':36s} {'backend':30s} {'us':>9s} {'dev us':>8s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'TFLOP/s':>8s} {'%mm':>5s}")
    for r in results:
        if "ratio" in r:
            print(f"{r['case']:36s} {r['backend']:30s} ratio {r['ratio']:.2f}")
            continue
        if "error" in r:
            print(f"{r['case']:36s} {r['backend']:30s} ERROR {r['error'][:60]}")
            continue
        dv = f"{r['us_dev_loop']:8.1f}" if "us_dev_loop" in r else " " * 8
        g = f"{r['GBps']:7.0f}" if "GBps" in r else " " * 7
        fc = f"{100 * r['frac_copy']:5.0f}%" if "frac_copy" in r else " " * 6
        tf = f"{r['TFLOPs']:8.1f}" if "TFLOPs" in r else " " * 8
        fm = f"{100 * r['frac_mm']:4.0f}%" if "frac_mm" in r else " " * 5
        best = " *best" if r.get("best") else ""
        print(f"{r['case']:36s} {r['backend']:30s} {r['us']:9.1f} {dv} {g} {fc} {tf} {fm}{best}")


def main():
    global DEVICE_LOOP_UNDER_US, DEADLINE, OUT_JSON
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", default=None, help="print a saved JSON as markdown and exit")
    ap.add_argument("--skip", default="", help="with --markdown: backends to leave out")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--backends", default="triton,mosaic_gpu",
                    help="comma-separated kernel names the dispatch knows (+ mosaic_gpu_lane/_wg)")
    ap.add_argument("--quick", action="store_true", help="llama only, fewer cases")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="after the default cases, time the SWEEP knob sets on SWEEP_CASES")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (and the ceilings)")
    ap.add_argument("--sweep-cases", default="",
                    help="comma-separated model:kind:batch:n cases for the sweep (default: SWEEP_CASES)")
    ap.add_argument("--kinds", default="decode,prefill,mixed",
                    help="which default case kinds to run (comma-separated subset)")
    ap.add_argument("--device-loop-under-us", type=float, default=DEVICE_LOOP_UNDER_US,
                    help="also time cases faster than this in a jitted device loop (0: never)")
    ap.add_argument("--device-loop", action="store_true",
                    help="time every case in a device loop too (same as a huge threshold)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="wall-clock seconds for the whole run; cases left after it are skipped")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(a.markdown, tuple(x for x in a.skip.split(",") if x)))
        return
    t_start = time.monotonic()
    DEADLINE = t_start + a.budget_s
    DEVICE_LOOP_UNDER_US = float("inf") if a.device_loop else a.device_loop_under_us
    Path(a.out).mkdir(parents=True, exist_ok=True)
    OUT_JSON = Path(a.out, "bench_attention.json")
    dev = jax.devices()[0]
    info = dict(device=str(dev.device_kind), jax=jax.__version__, argv=sys.argv[1:])
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    print(info, flush=True)
    ceil = ceilings()
    print(json.dumps(ceil), flush=True)
    STATE.update(info=info, ceilings=ceil)
    fns = our_backends(a.backends.split(","))
    results = RESULTS
    models = ["llama3.1-8b"] if a.quick else list(MODELS)
    baselines = not a.no_baselines
    decode_cases = [(b, c) for b in (1, 32, 256) for c in (1024, 8192, 32768)
                    if not a.quick or (b, c) in ((1, 32768), (32, 8192), (256, 8192))]
    prefill_cases = ((1, 8192), (16, 512))
    kinds = set(a.kinds.split(","))
    if not a.sweep_only:
        for model in models:
            for batch, ctx in decode_cases if "decode" in kinds else ():
                bench_decode(results, fns, model, batch, ctx, baselines)
            for batch, seqlen in prefill_cases if "prefill" in kinds else ():
                bench_prefill(results, fns, model, batch, seqlen, baselines)
            if "mixed" in kinds:
                bench_mixed(results, fns, model)
    sweep_cases = SWEEP_CASES
    if a.sweep_cases:
        sweep_cases = [(m, k, int(b), int(n)) for m, k, b, n in
                       (c.split(":") for c in a.sweep_cases.split(","))]
    if a.sweep or a.sweep_only:
        for model, kind, batch, n in sweep_cases:
            if model in models:
                bench = bench_decode if kind == "decode" else bench_prefill
                bench(results, fns, model, batch, n, False, sweep=True)
    mark_best(results)
    STATE["info"]["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    print_table(results, ceil)
    print(f"wall {STATE['info']['wall_s']} s (budget {a.budget_s} s)")


if __name__ == "__main__":
    main()
