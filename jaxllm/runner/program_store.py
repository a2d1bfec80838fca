"""Size cap of the stored-program cache (``<compilation cache dir>/jaxllm-programs/``).

Each engine configuration x jaxllm source version stores its own compiled programs (about 63 MB
for Llama-3.1-8B's 24 programs), so the directory grows with every upgrade. Loading a program
touches its file; after a start-up, the least recently used files are removed until the directory
holds at most ``JAXLLM_PROGRAM_CACHE_GB`` (default 8) GiB.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 30


def max_bytes() -> int:
    """The cap from ``JAXLLM_PROGRAM_CACHE_GB`` (a number of GiB), else 8 GiB."""
    value = os.environ.get("JAXLLM_PROGRAM_CACHE_GB")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"JAXLLM_PROGRAM_CACHE_GB: must be a number of GiB, got {value!r}") from None
    if gb < 0:
        raise ValueError(f"JAXLLM_PROGRAM_CACHE_GB: must be >= 0, got {value!r}")
    return int(gb * (1 << 30))


def touch(path: str) -> None:
    """Mark a stored program as just used (its modification time orders the eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune(directory: str, limit: int, keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove the least recently used ``*.pkl`` files until ``directory`` holds <= ``limit`` bytes.

    ``keep`` (paths of the programs this engine uses) are never removed. Returns the removed paths.
    """
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".pkl"):
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path in keep:
            continue
        try:
            os.remove(path)
        except OSError:
            continue
        total -= size
        removed.append(path)
    if removed:
        logger.info("stored programs: removed %d least recently used (cap %.1f GiB)", len(removed),
                    limit / (1 << 30))
    return removed
