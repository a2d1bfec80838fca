"""Ragged paged attention: one entry point, several backends chosen by platform.

Backends (each a module beside this one, imported lazily so a missing ``jax_triton`` or a
CPU-only jax never breaks ``import pallas_kernels``):

==============  ===========================================  ==================================
backend         runs on                                      interpret=True on other platforms
==============  ===========================================  ==================================
reference       any platform (pure jnp; the CPU backend)      n/a (always runs)
mosaic_tpu      tpu                                          yes: TPU interpreter (``tpu.py``)
mosaic_gpu      gpu with compute capability >= 9.0 (Hopper)  no
mosaic_gpu_ws   same (warp-specialized prefill kernel)        no
triton          gpu (via jax_triton)                         no
==============  ===========================================  ==================================

``backend="auto"`` picks from ``jax.devices()[0].platform``: tpu → mosaic_tpu, gpu → triton
(then, on Hopper, mosaic_gpu when jax_triton is not installed), anything else → reference
(skipping a kernel whose module or dependencies are not installed). On the H100 the Triton
kernel was faster than the Mosaic GPU one in every benchmarked case (BENCHMARKS.md, run 5);
``mosaic_gpu_ws`` is only used when named.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

BACKENDS = ("auto", "reference", "mosaic_gpu", "mosaic_gpu_ws", "triton", "mosaic_tpu")
# backend -> (module, function) for the lazily imported kernels.
_KERNELS = {
    "mosaic_tpu": ("pallas_kernels.ragged_paged_attention.tpu", "ragged_paged_attention_mosaic_tpu"),
    "mosaic_gpu": ("pallas_kernels.ragged_paged_attention.gpu_mosaic",
                   "ragged_paged_attention_mosaic_gpu"),
    "mosaic_gpu_ws": ("pallas_kernels.ragged_paged_attention.gpu_mosaic_ws",
                      "ragged_paged_attention_mosaic_gpu_ws"),
    "triton": ("pallas_kernels.ragged_paged_attention.gpu_triton", "ragged_paged_attention_triton"),
}
# Extra modules a backend needs at run time (checked before use, so "auto" can fall back).
_REQUIRES = {"triton": ("triton", "jax_triton")}
# Backends whose kernel can run in an interpreter on any platform when interpret=True.
INTERPRETABLE = ("mosaic_tpu",)
Q_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KV_DTYPES = Q_DTYPES + (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8)
_INT32_ARGS = ("kv_lens", "page_indices", "cu_q_lens", "num_seqs")


def platform_info() -> tuple[str, float]:
    """(platform, compute capability or 0.0) of the default device."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
    return dev.platform, float(cc) if cc else 0.0


def backends_for_platform(platform: str, compute_capability: float = 0.0) -> tuple[str, ...]:
    """Backends that run natively on ``platform``, preferred first."""
    if platform == "tpu":
        return ("mosaic_tpu", "reference")
    if platform == "gpu":
        return ("triton",) + (("mosaic_gpu", "mosaic_gpu_ws") if compute_capability >= 9.0 else ()) + ("reference",)
    return ("reference",)


def kernel_supports(backend: str, q, kv_pages) -> bool:
    """Shape/dtype limits of each kernel (so "auto" can fall back to the next backend)."""
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    group = num_q_heads // max(1, num_combined // 2)
    if backend in ("mosaic_gpu", "mosaic_gpu_ws"):
        return (q.dtype in (jnp.bfloat16, jnp.float16) and kv_pages.dtype == q.dtype and head_dim % 64 == 0
                and 8 <= page_size <= 256 and page_size & (page_size - 1) == 0 and group <= 64)
    if backend == "triton":
        return head_dim & (head_dim - 1) == 0
    return True


def resolve_backend(backend: str, interpret: bool = False, q=None, kv_pages=None) -> str:
    """Maps ``backend`` ("auto" or a name) to the backend that will run, or raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    platform, cc = platform_info()
    native = backends_for_platform(platform, cc)
    if backend == "auto":
        return next(b for b in native if b == "reference" or b != "mosaic_gpu_ws" and (
            kernel_available(b) and (q is None or kernel_supports(b, q, kv_pages))))
    if backend in native or (interpret and backend in INTERPRETABLE):
        return backend
    where = f"{platform} (compute capability {cc})" if platform == "gpu" else platform
    hint = (f"; backends that can run in an interpreter with interpret=True: {INTERPRETABLE}"
            if backend not in INTERPRETABLE else f"; or pass interpret=True to interpret {backend!r}")
    raise ValueError(f"backend: {backend!r} cannot run on platform {where}; backends that can: "
                     f"{native}{hint}")


def validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                    sliding_window, soft_cap, k_scale, v_scale) -> None:
    """Static (shape/dtype/option) checks; raises ValueError naming the argument and the range."""
    if q.ndim != 3:
        raise ValueError(f"q: must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if kv_pages.ndim != 4:
        raise ValueError("kv_pages: must be [num_pages, page_size, 2 * num_kv_heads, head_dim], "
                         f"got shape {kv_pages.shape}")
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, kv_head_dim = kv_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"kv_pages: head_dim (axis 3) must equal q's head_dim {head_dim}, "
                         f"got {kv_head_dim}")
    if num_combined == 0 or num_combined % 2:
        raise ValueError(f"kv_pages: axis 2 must be 2 * num_kv_heads (even, >= 2), got {num_combined}")
    if num_q_heads % (num_combined // 2):
        raise ValueError(f"q: num_q_heads ({num_q_heads}) must be divisible by num_kv_heads "
                         f"({num_combined // 2})")
    if page_size < 1:
        raise ValueError(f"kv_pages: page_size (axis 1) must be >= 1, got {page_size}")
    if q.dtype not in Q_DTYPES:
        raise ValueError(f"q: dtype must be one of {[jnp.dtype(d).name for d in Q_DTYPES]}, "
                         f"got {q.dtype}")
    if kv_pages.dtype not in KV_DTYPES:
        raise ValueError(f"kv_pages: dtype must be one of {[jnp.dtype(d).name for d in KV_DTYPES]}, "
                         f"got {kv_pages.dtype}")
    if page_indices.ndim != 2:
        raise ValueError("page_indices: must be 2-D [max_num_seqs, pages_per_seq], "
                         f"got shape {page_indices.shape}")
    num_seqs_max = page_indices.shape[0]
    expected = {"kv_lens": (num_seqs_max,), "cu_q_lens": (num_seqs_max + 1,), "num_seqs": (1,)}
    for name, arr in (("kv_lens", kv_lens), ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs)):
        if arr.shape != expected[name]:
            raise ValueError(f"{name}: must have shape {expected[name]} (max_num_seqs = "
                             f"page_indices.shape[0] = {num_seqs_max}), got {arr.shape}")
    for name, arr in zip(_INT32_ARGS, (kv_lens, page_indices, cu_q_lens, num_seqs)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name}: dtype must be int32, got {arr.dtype}")
    if not (isinstance(sm_scale, numbers.Real) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale: must be a finite float > 0, got {sm_scale!r}")
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window >= 1):
        raise ValueError(f"sliding_window: must be None or an int >= 1, got {sliding_window!r}")
    if soft_cap is not None and not (isinstance(soft_cap, numbers.Real) and soft_cap > 0):
        raise ValueError(f"soft_cap: must be None or a float > 0, got {soft_cap!r}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale)
                                      and scale > 0):
            raise ValueError(f"{name}: must be None or a finite float > 0, got {scale!r}")


def kernel_available(backend: str) -> bool:
    """Whether ``backend``'s module and its run-time dependencies are installed."""
    mods = (_KERNELS[backend][0],) + _REQUIRES.get(backend, ())
    return all(importlib.util.find_spec(m) is not None for m in mods)


def load_kernel(backend: str):
    """Imports the kernel function of ``backend`` (not "reference"); ValueError if unavailable."""
    module, fn = _KERNELS[backend]
    missing = [m for m in _REQUIRES.get(backend, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"backend: {backend!r} is unavailable here ({', '.join(missing)} not "
                         "installed); use backend='reference' or install it")
    try:
        return getattr(importlib.import_module(module), fn)
    except ImportError as e:  # e.g. jax_triton / triton not installed
        raise ValueError(f"backend: {backend!r} is unavailable here ({e}); use backend='reference' "
                         "or install its dependencies") from e


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale",
                                             "v_scale", "backend", "interpret"))
def ragged_paged_attention(
    q: jax.Array,             # [T, num_q_heads, head_dim], tokens packed request by request
    kv_pages: jax.Array,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: jax.Array,       # i32[S] context length of each sequence incl. this step's tokens
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,     # i32[S + 1]
    num_seqs: jax.Array,      # i32[1]; sequences past num_seqs are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:               # [T, num_q_heads, head_dim]
    """Causal attention of each sequence's last q_len tokens over its paged KV context.

    Sequence i owns flat tokens ``cu_q_lens[i] .. cu_q_lens[i+1]`` of ``q``; they are the last
    ``q_len`` positions of a context of ``kv_lens[i]`` tokens, and query j attends keys
    ``0 .. kv_lens[i] - q_len + j`` (with a sliding window only the last ``sliding_window`` of
    them). Key slot ``p`` of sequence i is ``kv_pages[page_indices[i, p // page_size],
    p % page_size]``; K of kv head h sits at combined index 2h, V at 2h+1. GQA: q head ``j``
    uses kv head ``j // (num_q_heads // num_kv_heads)``.

    Args:
      q: ``[T, num_q_heads, head_dim]`` float32/bfloat16/float16 queries of all sequences,
        packed back to back; rows past ``cu_q_lens[num_seqs]`` are padding.
      kv_pages: ``[num_pages, page_size, 2 * num_kv_heads, head_dim]`` paged KV cache (float,
        float8_e4m3fn/e5m2 or int8; quantized values are multiplied by k_scale / v_scale).
      kv_lens: ``i32[S]`` context length of each sequence including this step's tokens.
      page_indices: ``i32[S, pages_per_seq]`` page table; entries past a sequence's last page
        are never read by the kernels.
      cu_q_lens: ``i32[S + 1]`` cumulative query lengths (``cu_q_lens[0] == 0``).
      num_seqs: ``i32[1]`` number of real sequences; the rest are padding.
      sm_scale: softmax scale applied to ``q @ k^T`` (usually ``head_dim ** -0.5``).
      sliding_window: if set, each query sees only its last ``sliding_window`` keys.
      soft_cap: if set, scores become ``soft_cap * tanh(scores / soft_cap)`` before masking.
      k_scale: dequantization scale of K (for fp8 / int8 caches).
      v_scale: dequantization scale of V.
      backend: "auto", "reference", "mosaic_gpu", "triton" or "mosaic_tpu" (static).
      interpret: run an interpretable kernel (mosaic_tpu) in the interpreter on any platform.

    Returns:
      ``[T, num_q_heads, head_dim]`` in q's dtype. Rows of padding tokens are unspecified.

    Raises:
      ValueError: at trace time, for shapes/dtypes/options outside the contract or a backend
        that cannot run on this platform.
    """
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                    sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale,
                    v_scale=v_scale)
    backend = resolve_backend(backend, interpret, q, kv_pages)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  k_scale=k_scale, v_scale=v_scale)
    if backend == "reference":
        return ref_ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                          **kwargs)
    return load_kernel(backend)(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                            interpret=interpret, **kwargs)


__all__ = ["BACKENDS", "INTERPRETABLE", "backends_for_platform", "kernel_available", "load_kernel",
           "platform_info",
           "ragged_paged_attention", "ref_ragged_paged_attention", "resolve_backend",
           "validate_inputs"]
