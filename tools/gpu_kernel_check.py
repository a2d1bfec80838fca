"""Correctness check of the GPU ragged paged attention backends against the reference.

Runs on a GPU host (see BENCHMARKS.md for the exact device command). For every case it draws
fresh random bf16 inputs, fills every KV slot no query may see with NaN (pages no sequence
owns, to which the unused tail of each page-table row points; the slots past kv_len in each
sequence's last page; the slots before the sliding window of its first query), runs each
backend and compares with ``ref_ragged_paged_attention`` evaluated in float32 on NaN-free pages:
rel = ||out - ref|| / ||ref|| must be < 1e-2 and the output NaN-free.

    python3 tools/gpu_kernel_check.py [--backends triton,mosaic_gpu] [--json out.json]
    python3 tools/gpu_kernel_check.py --lower-only --backends mosaic_gpu_lane,mosaic_gpu_wg

``--lower-only`` (any host, no GPU needed) lowers each Mosaic GPU backend for CUDA instead of
running it: Mosaic GPU's lowering and layout inference see every case's shapes. Backend names:
``triton`` and ``mosaic_gpu[_ws][_lane|_wg][:bn<int>][:s<int>][:sp<int>]`` (see
``gpu_mosaic.kernel_from_name``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention  # noqa: E402

TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    hq: int = 8
    hkv: int = 2
    d: int = 128
    ps: int = 16
    max_seqs: int | None = None   # > len(q_lens): padded sequences
    extra_tokens: int = 0         # padded tokens after the last real one
    window: int | None = None
    cap: float | None = None


def cases(rng: np.random.Generator) -> list[Case]:
    r = lambda lo, hi, n: tuple(int(x) for x in rng.integers(lo, hi, n))  # noqa: E731
    out = []
    for ps in (16, 32, 64):
        for d in (64, 128):
            for g, hkv in ((1, 4), (4, 2), (8, 1)):
                kv = r(1, 700, 6)
                out.append(Case(f"decode ps{ps} d{d} g{g}", (1,) * 6, kv, hq=g * hkv, hkv=hkv,
                                d=d, ps=ps))
    kv = r(40, 500, 3)
    out.append(Case("prefill", kv, kv))
    out.append(Case("prefill g8 d64", kv, kv, hq=8, hkv=1, d=64, ps=32))
    dec = r(1, 900, 5)
    chunk = (97, 256)
    out.append(Case("mixed", (1,) * 5 + (300,), dec + (300,), hq=32, hkv=8))
    out.append(Case("chunked", chunk + (1, 1), (400, 256 + 513, 77, 1), ps=64))
    out.append(Case("padded seqs/tokens", (3, 1, 50), (3, 200, 120), max_seqs=7,
                    extra_tokens=13))
    out.append(Case("sliding window", (1, 1, 120, 33), (600, 40, 300, 33), window=64))
    out.append(Case("soft cap", (1, 70, 1), (333, 70, 20), cap=5.0, ps=32))
    out.append(Case("window+cap g4 d64", (1, 64), (1000, 500), hq=16, hkv=4, d=64, window=100,
                    cap=20.0))
    out.append(Case("long decode (split-K)", (1,), (9000,), hq=32, hkv=8, ps=16))
    out.append(Case("long decode b3 (split-K)", (1, 1, 1), (5000, 3, 12000), hq=28, hkv=4,
                    ps=64))
    return out


def make_inputs(case: Case, rng: np.random.Generator):
    """bf16 inputs with NaN in every slot no query may see; also the NaN-free f32 kv for ref."""
    s = case.max_seqs or len(case.q_lens)
    n = len(case.q_lens)
    ql = np.zeros(s, np.int32)
    ql[:n] = case.q_lens
    kl = np.zeros(s, np.int32)
    kl[:n] = case.kv_lens
    cu = np.concatenate([[0], np.cumsum(ql)]).astype(np.int32)
    t = int(cu[-1]) + case.extra_tokens
    pages_per_seq = max(1, -(-max(case.kv_lens) // case.ps))
    used = [-(-int(k) // case.ps) for k in kl]
    num_pages = sum(used) + 8
    perm = rng.permutation(num_pages).astype(np.int32)
    free = perm[sum(used):]                                   # pages nobody owns
    pi = np.empty((s, pages_per_seq), np.int32)
    off = 0
    for i in range(s):
        pi[i, :used[i]] = perm[off:off + used[i]]
        pi[i, used[i]:] = rng.choice(free, pages_per_seq - used[i])
        off += used[i]
    kv = rng.standard_normal((num_pages, case.ps, 2 * case.hkv, case.d)).astype(np.float32)
    kv_clean = kv.copy()
    # NaN wherever no query may look: free pages, the tail of each seq's last page, and the
    # slots before the sliding window of its first query (inside pages it does read).
    visible = np.zeros((num_pages, case.ps), bool)
    for i in range(n):
        first = 0 if case.window is None else max(int(kl[i] - ql[i]) - case.window + 1, 0)
        pos = np.arange(first, int(kl[i]))
        visible[pi[i, pos // case.ps], pos % case.ps] = True
    kv[~visible] = np.nan
    kv_clean[~visible] = 0.0
    q = rng.standard_normal((t, case.hq, case.d)).astype(np.float32)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    args = (bf(q), bf(kv), jnp.asarray(kl), jnp.asarray(pi), jnp.asarray(cu),
            jnp.asarray([n], jnp.int32))
    ref_args = (bf(q).astype(jnp.float32), bf(kv_clean).astype(jnp.float32)) + args[2:]
    return args, ref_args


def load_backends(names: list[str]) -> dict:
    fns = {}
    for name in names:
        try:
            if name == "triton":
                from pallas_kernels.ragged_paged_attention.gpu_triton import (
                    ragged_paged_attention_triton as fn)
            elif name.startswith("mosaic_gpu"):   # mosaic_gpu[_ws][_lane|_wg][:knob...]
                from pallas_kernels.ragged_paged_attention.gpu_mosaic import kernel_from_name
                fn = kernel_from_name(name)
            else:
                raise ValueError(f"--backends: unknown backend {name!r}")
            fns[name] = fn
        except Exception as e:  # report and go on with the others
            fns[name] = e
    return fns


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="triton,mosaic_gpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lower-only", action="store_true",
                    help="lower each mosaic backend for cuda (no GPU needed) instead of running")
    a = ap.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    rng = np.random.default_rng(a.seed)
    fns = load_backends(a.backends.split(","))
    rows, failures = [], 0
    for case in cases(rng):
        args, ref_args = make_inputs(case, rng)
        scale = 1.0 / np.sqrt(case.d)
        kw = dict(sm_scale=float(scale), sliding_window=case.window, soft_cap=case.cap)
        if not a.lower_only:
            ref = np.asarray(jax.jit(lambda *x: ref_ragged_paged_attention(*x, **kw))(*ref_args))
        for name, fn in fns.items():
            row = dict(case=case.name, backend=name)
            if isinstance(fn, Exception):
                row.update(status=f"import failed: {fn!r}"[:200])
            elif a.lower_only:
                try:
                    t0 = time.perf_counter()
                    jax.jit(functools.partial(fn, **kw)).trace(*args).lower(
                        lowering_platforms=("cuda",))
                    row.update(secs=round(time.perf_counter() - t0, 2), status="ok")
                except Exception as e:
                    row.update(status=f"error: {type(e).__name__}: {e}"[:300])
            else:
                try:
                    t0 = time.perf_counter()
                    out = np.asarray(fn(*args, **kw).astype(jnp.float32))
                    row["secs"] = round(time.perf_counter() - t0, 2)
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                    nan = bool(np.isnan(out).any())
                    row.update(rel_err=err, nan=nan,
                               status="ok" if err < TOL and not nan else "FAIL")
                except Exception as e:
                    traceback.print_exc()
                    row.update(status=f"error: {type(e).__name__}: {e}"[:300])
            failures += row["status"] != "ok"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'case':28s} {'backend':11s} {'rel_err':>9s}  status")
    for r in rows:
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
        print(f"{r['case']:28s} {r['backend']:11s} {err:>9s}  {r['status'][:90]}")
    print(f"{failures} of {len(rows)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
