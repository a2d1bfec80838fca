"""Micro-benchmark of the on-device sampler and its host-side metadata builder (not a test).

    python tests/layers/bench_sampler.py [--vocab 151936] [--seqs 8 64 256] [--hist 4096]

Prints one line per (S, path): median device time of ``sample`` under jit, and the host time of
``build_sampling_metadata`` for the same rows.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxllm.layers.sampler import sample
from jaxllm.layers.sampling_metadata import SamplingRow, build_sampling_metadata

PATHS = {
    "greedy": dict(temperature=0.0),
    "random": dict(temperature=0.8),
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p+min_p": dict(temperature=0.8, top_p=0.95, min_p=0.05),
    "penalties": dict(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2),
    "all": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                presence_penalty=0.3),
}


def timeit(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seqs", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--hist", type=int, default=4096)
    ap.add_argument("--logprobs", type=int, default=20)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} V={args.vocab} "
          f"H={args.hist} K={args.logprobs}")
    fn = jax.jit(sample, static_argnames=("num_logprobs",))
    rng = np.random.default_rng(0)
    for s in args.seqs:
        logits = jax.device_put(rng.standard_normal((s, args.vocab), dtype=np.float32) * 3)
        hists = [rng.integers(0, args.vocab, args.hist // 2, dtype=np.int32) for _ in range(s)]
        for name, kw in PATHS.items():
            rows = [SamplingRow(seed=i, step=7, token_ids=hists[i], prompt_len=args.hist // 4, **kw)
                    for i in range(s)]
            md = jax.device_put(build_sampling_metadata(rows, s, args.hist, 4))
            fn(logits, md, num_logprobs=args.logprobs).token_ids.block_until_ready()
            dev = timeit(lambda: fn(logits, md, num_logprobs=args.logprobs).token_ids.block_until_ready(),
                         args.iters)
            host = timeit(lambda: build_sampling_metadata(rows, s, args.hist, 4), args.iters)
            print(f"S={s:4d} {name:12s} sample {dev * 1e3:8.3f} ms   build_metadata {host * 1e3:7.3f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
