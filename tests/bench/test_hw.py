"""The hardware probe runs on the CPU backend with small sizes (the code path, not the numbers)."""

from __future__ import annotations

import math

import pytest

from jaxllm.bench import hw


def test_probe_small_sizes_on_cpu():
    p = hw.probe(copy_bytes=1 << 20, matmul_n=64, reps=3)
    d = p.to_dict()
    assert p.platform == "cpu" and p.copy_bytes == 1 << 20 and p.matmul_n == 64
    for key in ("copy_bandwidth", "matmul_flops_per_s", "copy_bandwidth_gb_s", "matmul_tflops"):
        assert d[key] > 0 and math.isfinite(d[key]), key
    assert math.isclose(d["copy_bandwidth_gb_s"], p.copy_bandwidth / 1e9)


def test_median_time_counts_per_call():
    calls = []

    def fn(i):
        calls.append(i)
        return i

    t = hw._median_time(fn, reps=3, inner=4, warmup=2)
    assert t >= 0
    # warm-up calls 0, 1; then rep r issues buffers r*inner .. r*inner+inner-1 (rotating)
    assert calls == [0, 1] + list(range(12))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="nbytes"):
        hw.measure_copy_bandwidth(1)
    with pytest.raises(ValueError, match="n:"):
        hw.measure_matmul_rate(0)
    with pytest.raises(ValueError, match="reps"):
        hw._median_time(lambda i: i, reps=0, inner=1, warmup=0)


def test_probe_halves_copy_size_when_memory_is_short(monkeypatch):
    tried = []

    def fake_copy(nbytes, **kw):
        tried.append(nbytes)
        if nbytes > (128 << 20):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return 1e9

    monkeypatch.setattr(hw, "measure_copy_bandwidth", fake_copy)
    p = hw.probe(copy_bytes=1 << 30, matmul_n=32, reps=3)
    assert tried == [1 << 30, 512 << 20, 256 << 20, 128 << 20]
    assert p.copy_bytes == 128 << 20 and p.copy_bandwidth == 1e9
