"""Padding ladders: every dynamic size of the step is padded to one of a few static buckets.

One bucket is a pair ``(T, S)``: T padded scheduled tokens and S padded sequences. The two are
coupled (S = min(T, max_num_seqs)) rather than crossed: a step never has more sequences than
tokens, the per-sequence work (metadata, LM head over S rows, sampling) is small next to the
per-token work, and coupling keeps the number of compiled programs at ~log2(max tokens) instead of
its square. Each bucket is compiled once at start-up.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_TOKEN_BUCKET = 8


@dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int  # T
    num_seqs: int    # S


def token_ladder(max_num_batched_tokens: int, min_bucket: int = MIN_TOKEN_BUCKET) -> list[int]:
    """Powers of two from ``min_bucket`` up to (and always including) ``max_num_batched_tokens``."""
    ladder, t = [], min_bucket
    while t < max_num_batched_tokens:
        ladder.append(t)
        t *= 2
    ladder.append(max_num_batched_tokens)
    return ladder


def make_buckets(max_num_batched_tokens: int, max_num_seqs: int) -> list[Bucket]:
    return [Bucket(t, min(t, max_num_seqs)) for t in token_ladder(max_num_batched_tokens)]


def pick_bucket(buckets: list[Bucket], num_tokens: int, num_seqs: int) -> Bucket:
    """The smallest bucket that holds ``num_tokens`` tokens and ``num_seqs`` sequences."""
    i = bisect.bisect_left([b.num_tokens for b in buckets], num_tokens)
    while i < len(buckets) and buckets[i].num_seqs < num_seqs:
        i += 1
    if i == len(buckets):
        raise ValueError(f"no bucket holds {num_tokens} tokens / {num_seqs} sequences "
                         f"(largest: {buckets[-1]})")
    return buckets[i]
