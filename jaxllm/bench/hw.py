"""Hardware probe: the device-copy bandwidth and the bf16 matmul rate, measured in this process.

The roofline numbers of ``jaxllm bench`` divide by these two rates, so they are measured on the
same device, in the same process and run as the benchmark, with the same timing rules:

* every timed call ends in ``block_until_ready`` (JAX dispatches asynchronously);
* warm-up calls first (compilation and allocator growth are not timed);
* each timed rep launches ``inner`` calls on rotating buffers and syncs once, so host dispatch
  overhead is amortised; the reported rate is the median over reps.

The benchmarks probe *after* their measured region: probing first would raise the allocator's
peak, which the engine subtracts when it sizes the KV cache from free memory. If the copy buffers
no longer fit beside the KV cache, the copy size is halved (``HwProbe.copy_bytes`` says what ran).

Copy: ``y = x * s`` with ``s`` a runtime scalar, so XLA can neither elide the copy nor fold it;
it reads ``n`` bytes and writes ``n`` bytes, and both are counted (as ``cudaMemcpy`` bandwidth
tests do). Matmul: ``a @ b`` in bf16, ``2 n^3`` FLOPs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import jax
import jax.numpy as jnp

# Sizes on accelerators and on the CPU backend (where the probe only has to exercise the code path).
GPU_COPY_BYTES = 1 << 30           # 1 GiB per buffer: far larger than any L2
CPU_COPY_BYTES = 16 << 20
GPU_MATMUL_N = 8192
CPU_MATMUL_N = 256
MIN_COPY_BYTES = 64 << 20


@dataclass(frozen=True)
class HwProbe:
    """Measured device rates (medians) and what was measured."""
    device: str
    platform: str
    copy_bytes: int               # bytes of one buffer (read once and written once per call)
    copy_bandwidth: float         # bytes/s, counting read + write
    copy_reps: int
    matmul_n: int
    matmul_flops_per_s: float     # bf16 FLOP/s (2 n^3 per product)
    matmul_reps: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["copy_bandwidth_gb_s"] = self.copy_bandwidth / 1e9
        d["matmul_tflops"] = self.matmul_flops_per_s / 1e12
        return d


def _median_time(fn: Callable[[int], jax.Array], reps: int, inner: int, warmup: int) -> float:
    """Median seconds per call of ``fn(i)`` (``i`` picks the rotating buffer)."""
    if reps < 1 or inner < 1:
        raise ValueError(f"reps: must be >= 1 (and inner >= 1), got reps={reps}, inner={inner}")
    for i in range(max(warmup, 1)):
        jax.block_until_ready(fn(i))
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        outs = [fn(r * inner + k) for k in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
        del outs
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int, *, reps: int = 20, inner: int = 2, warmup: int = 3,
                           num_buffers: int = 2, device: jax.Device | None = None) -> float:
    """Device-memory bandwidth in bytes/s (read + write) of a jitted bf16 copy of ``nbytes``."""
    if nbytes < 2:
        raise ValueError(f"nbytes: must be >= 2, got {nbytes}")
    device = device or jax.devices()[0]
    n = nbytes // 2
    keys = jax.random.split(jax.random.key(0), num_buffers)
    # num_buffers distinct sources, used in turn: a rep never re-reads what the last one wrote.
    srcs = [jax.device_put(jax.random.normal(k, (n,), jnp.bfloat16), device) for k in keys]
    scale = jax.device_put(jnp.asarray(1.0, jnp.bfloat16), device)
    copy = jax.jit(lambda x, s: x * s)   # x: [n] bf16 → [n] bf16: n reads + n writes
    t = _median_time(lambda i: copy(srcs[i % num_buffers], scale), reps, inner, warmup)
    del srcs
    return 2 * n * 2 / t


def measure_matmul_rate(n: int, *, reps: int = 10, inner: int = 2, warmup: int = 2,
                        device: jax.Device | None = None) -> float:
    """bf16 matmul rate in FLOP/s of an ``n x n x n`` product (``2 n^3`` FLOPs)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(1))
    # two left operands used in turn, a: [n, n] each; b: [n, n]
    a = [jax.device_put(jax.random.normal(k, (n, n), jnp.bfloat16), device) for k in jax.random.split(ka)]
    b = jax.device_put(jax.random.normal(kb, (n, n), jnp.bfloat16), device)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
    t = _median_time(lambda i: mm(a[i % 2], b), reps, inner, warmup)
    return 2 * n ** 3 / t


def probe(*, copy_bytes: int | None = None, matmul_n: int | None = None, reps: int = 20,
          device: jax.Device | None = None) -> HwProbe:
    """Measure both rates with sizes suited to the platform (override with ``copy_bytes``/``matmul_n``)."""
    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu"
    copy_bytes = copy_bytes or (CPU_COPY_BYTES if on_cpu else GPU_COPY_BYTES)
    matmul_n = matmul_n or (CPU_MATMUL_N if on_cpu else GPU_MATMUL_N)
    while True:  # after an engine took its KV cache, less may be free: halve down to 64 MiB
        try:
            bw = measure_copy_bandwidth(copy_bytes, reps=reps, device=device)
            break
        except Exception as e:  # jax's runtime error type moved between versions
            if "RESOURCE_EXHAUSTED" not in str(e) or copy_bytes <= MIN_COPY_BYTES:
                raise
            copy_bytes //= 2
    mm_reps = max(3, reps // 2)
    rate = measure_matmul_rate(matmul_n, reps=mm_reps, device=device)
    return HwProbe(device=getattr(device, "device_kind", str(device)), platform=device.platform,
                   copy_bytes=copy_bytes, copy_bandwidth=bw, copy_reps=reps, matmul_n=matmul_n,
                   matmul_flops_per_s=rate, matmul_reps=mm_reps)


def main(argv: list[str] | None = None) -> None:
    """``python -m jaxllm.bench.hw [--output-json PATH] [--copy-bytes N] [--matmul-n N]``"""
    import argparse
    import json

    p = argparse.ArgumentParser(description="Measure device-copy bandwidth and bf16 matmul rate.")
    p.add_argument("--copy-bytes", type=int, default=None)
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    d = probe(copy_bytes=args.copy_bytes, matmul_n=args.matmul_n, reps=args.reps).to_dict()
    print(json.dumps(d, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(d, f, indent=2)


if __name__ == "__main__":
    main()
