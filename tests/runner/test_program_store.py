"""Stored-program cache cap: least recently used files go first; the engine's own are kept."""

import os

import pytest

from jaxllm.runner import program_store


def _file(d, name, size, mtime):
    p = d / name
    p.write_bytes(b"x" * size)
    os.utime(p, (mtime, mtime))
    return str(p)


def test_prune_removes_least_recently_used_until_under_the_cap(tmp_path):
    old = _file(tmp_path, "a.pkl", 100, 1_000)
    mid = _file(tmp_path, "b.pkl", 100, 2_000)
    new = _file(tmp_path, "c.pkl", 100, 3_000)
    other = _file(tmp_path, "notes.txt", 1000, 500)            # not a program: never counted
    assert program_store.prune(str(tmp_path), 250) == [old]
    assert sorted(os.listdir(tmp_path)) == ["b.pkl", "c.pkl", "notes.txt"]
    program_store.touch(mid)                                   # b becomes the most recent
    assert program_store.prune(str(tmp_path), 100) == [new]
    assert os.path.exists(mid) and os.path.exists(other)


def test_prune_keeps_the_engines_programs_even_over_the_cap(tmp_path):
    a = _file(tmp_path, "a.pkl", 100, 1_000)
    b = _file(tmp_path, "b.pkl", 100, 2_000)
    assert program_store.prune(str(tmp_path), 0, keep=frozenset({a})) == [b]
    assert os.listdir(tmp_path) == ["a.pkl"]


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv("JAXLLM_PROGRAM_CACHE_GB", raising=False)
    assert program_store.max_bytes() == 8 << 30
    monkeypatch.setenv("JAXLLM_PROGRAM_CACHE_GB", "0.5")
    assert program_store.max_bytes() == 1 << 29
    for bad in ("lots", "-1"):
        monkeypatch.setenv("JAXLLM_PROGRAM_CACHE_GB", bad)
        with pytest.raises(ValueError, match="JAXLLM_PROGRAM_CACHE_GB"):
            program_store.max_bytes()
