"""Benchmark results: run metadata (device, versions, args), percentile summaries, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from importlib import metadata
from typing import Any, Iterator, Sequence

import numpy as np


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Device, library versions and the command's arguments (JSON-safe)."""
    import jax

    dev = jax.devices()[0]
    try:
        from jaxllm import __version__ as jaxllm_version  # type: ignore[attr-defined]
    except ImportError:
        jaxllm_version = _version("jaxllm")
    meta: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "versions": {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "jaxllm": jaxllm_version or "dev",
                     "flax": _version("flax"), "python": platform.python_version()},
        "host": platform.node(),
    }
    if args is not None:
        meta["args"] = {k: v for k, v in sorted(vars(args).items())
                        if not k.startswith("_") and k != "func" and _jsonable(v)}
    return meta


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def summarize(values_s: Sequence[float], prefix: str, percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """``{prefix}_mean_ms, _median_ms, _std_ms, _p{q}_ms`` of a list of seconds (NaN when empty)."""
    xs = np.asarray([v for v in values_s if v is not None and not math.isnan(v)], dtype=np.float64) * 1000
    out: dict[str, float] = {}
    if xs.size == 0:
        out.update({f"{prefix}_mean_ms": float("nan"), f"{prefix}_median_ms": float("nan"),
                    f"{prefix}_std_ms": float("nan")})
        out.update({f"{prefix}_p{q:g}_ms": float("nan") for q in percentiles})
        return out
    out[f"{prefix}_mean_ms"] = float(xs.mean())
    out[f"{prefix}_median_ms"] = float(np.median(xs))
    out[f"{prefix}_std_ms"] = float(xs.std())
    for q in percentiles:
        out[f"{prefix}_p{q:g}_ms"] = float(np.percentile(xs, q))
    return out


def _clean(obj: Any) -> Any:
    """NaN/inf → None (strict JSON), numpy scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | None, result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=2, allow_nan=False)
        f.write("\n")


@contextlib.contextmanager
def maybe_profile(trace_dir: str | None) -> Iterator[None]:
    """A JAX profiler trace of the enclosed (measured) region when ``trace_dir`` is set."""
    if not trace_dir:
        yield
        return
    import jax
    os.makedirs(trace_dir, exist_ok=True)
    # create_perfetto_trace: also a perfetto_trace.json.gz that ui.perfetto.dev opens directly and
    # tools/trace_summary.py summarizes (kernel time by name, GPU idle gaps).
    # Python function tracing is off unless JAXLLM_PROFILE_PYTHON=1: it slows the host several-fold,
    # which shows up as GPU idle gaps that an unprofiled run does not have.
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 1 if os.environ.get("JAXLLM_PROFILE_PYTHON") == "1" else 0
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=opts):
        yield


def random_prompts(num: int, length: int, vocab_size: int, seed: int, stream: int = 0) -> list[list[int]]:
    """``num`` prompts of ``length`` uniform random token ids (ids 0..9 avoided: often specials).

    ``(seed, stream)`` picks the draw: different streams give unrelated prompts (no prefix-cache hits)."""
    rng = np.random.default_rng([abs(seed), stream])
    lo = min(10, vocab_size - 1)
    return rng.integers(lo, vocab_size, size=(num, length)).tolist()


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """vLLM-style result block on stdout."""
    print(f"{'=' * 18} {title} {'=' * 18}")
    for name, value in rows:
        if isinstance(value, float):
            value = f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
        print(f"{name:<44} {value}")
    print("=" * (38 + len(title)))
