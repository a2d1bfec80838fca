"""Sampling metadata: the per-step contract between the runner and the on-device sampler.

Flow: ``Request`` + ``SamplingParams`` (host) → one ``SamplingRow`` per scheduled sequence →
``build_sampling_metadata`` packs padded numpy arrays → ``SamplingMetadata`` (a pytree; jit
arguments, moved to the device at the call or by ``from_host``) → ``layers.sampler.sample``.

S = padded number of sequences (sequence bucket), H = history capacity (static, e.g.
max_model_len), NB = banned-id capacity (static). Padded rows are greedy (temperature 0) with
every filter and penalty disabled, an empty history and nothing banned, so they cost nothing and
their sampled ids are simply ignored by the runner.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence

import jax
import numpy as np

# Temperatures below this are greedy (same threshold as SamplingParams.sampling_type).
SAMPLING_EPS = 1e-5


@dataclasses.dataclass
class SamplingMetadata:
    """Per-row sampling state for one step (every field an array; see the module docstring)."""

    temperature: jax.Array         # f32[S]     < SAMPLING_EPS → greedy row
    top_k: jax.Array               # i32[S]     0 → disabled
    top_p: jax.Array               # f32[S]     1.0 → disabled
    min_p: jax.Array               # f32[S]     0.0 → disabled
    presence_penalty: jax.Array    # f32[S]     0.0 → disabled
    frequency_penalty: jax.Array   # f32[S]     0.0 → disabled
    repetition_penalty: jax.Array  # f32[S]     1.0 → disabled
    seeds: jax.Array               # u32[S]     per-request seed
    steps: jax.Array               # i32[S]     tokens already generated (key = fold_in(key(seed), step))
    hist_ids: jax.Array            # i32[S, H]  prompt + output ids, -1 padded (only filled for penalty rows)
    prompt_lens: jax.Array         # i32[S]     leading entries of hist_ids that are prompt tokens
    banned_ids: jax.Array          # i32[S, NB] ids masked to -inf this step, -1 padded
    any_penalties: jax.Array       # bool[]     some row uses a penalty (else the penalty pass is skipped)
    any_top_k_top_p: jax.Array     # bool[]     some sampled row uses top-k/top-p (else no sort)
    # bool[] some row asked for logprobs: else the top-K (a full sort on GPU) is skipped and
    # top_ids / top_logprobs come back as zeros. Optional for callers: defaults to True.
    any_logprobs: jax.Array = True

    @classmethod
    def from_host(cls, rows: Sequence["SamplingRow"], num_seqs: int, hist_len: int,
                  num_banned: int) -> "SamplingMetadata":
        """``build_sampling_metadata`` followed by ``jax.device_put`` of every field."""
        return jax.device_put(build_sampling_metadata(rows, num_seqs, hist_len, num_banned))


jax.tree_util.register_dataclass(
    SamplingMetadata,
    data_fields=[f.name for f in dataclasses.fields(SamplingMetadata)],
    meta_fields=[],
)


@dataclasses.dataclass(slots=True)
class SamplingRow:
    """Host-side sampling values of one scheduled sequence (already validated by SamplingParams).

    ``token_ids`` is the full history (prompt then output; a list or a 1-D integer array) and
    ``prompt_len`` says how many of them are prompt tokens. It is only read when the row uses a
    penalty, so passing it for every row costs nothing.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    step: int = 0
    token_ids: Sequence[int] | np.ndarray = ()
    prompt_len: int = 0
    banned_ids: Sequence[int] = ()

    @classmethod
    def from_request(cls, request, seed: int) -> "SamplingRow":
        """The row for a ``jaxllm.request.Request`` about to sample its next token.

        Args:
          request: the request; its ``sampling_params``, ``all_token_ids``, ``num_prompt_tokens``,
            ``num_output_tokens`` and ``eos_token_ids`` are read.
          seed: ``sampling_params.seed`` if set, else the seed the engine drew for this request.

        While fewer than ``min_tokens`` tokens have been generated, the stop token ids and (unless
        ``ignore_eos``) the EOS ids are banned, as vLLM's min-tokens logits processor does.
        """
        sp = request.sampling_params
        num_out = request.num_output_tokens
        banned: Sequence[int] = ()
        if num_out < sp.min_tokens:
            ids = set(sp.all_stop_token_ids) | set(sp.stop_token_ids)
            if not sp.ignore_eos:
                ids |= set(request.eos_token_ids)
            banned = sorted(ids)
        return cls(sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.presence_penalty,
                   sp.frequency_penalty, sp.repetition_penalty, seed, num_out,
                   request.all_token_ids, request.num_prompt_tokens, banned)


_SCALARS = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "step", "prompt_len")
_get_scalars = operator.attrgetter(*_SCALARS)


@functools.lru_cache(maxsize=16)
def _empty_history(num_seqs: int, hist_len: int) -> np.ndarray:
    out = np.full((num_seqs, hist_len), -1, dtype=np.int32)
    out.flags.writeable = False
    return out


def _check(name: str, bad: np.ndarray, values: np.ndarray, allowed: str) -> None:
    if bad.any():
        raise ValueError(f"{name}: must be {allowed}, got {values[bad][0]!r} "
                         f"(row {int(np.flatnonzero(bad)[0])})")


def build_sampling_metadata(rows: Sequence[SamplingRow], num_seqs: int, hist_len: int,
                            num_banned: int) -> SamplingMetadata:
    """Packs per-row sampling values into padded numpy arrays (host side, no jax work).

    Scalars are gathered in one pass over the rows (``operator.attrgetter`` into one float64
    table). ``hist_ids`` (the only big array, ``S * H``) is only filled for rows that use a
    penalty (a 1-D numpy history is one memcpy; a Python list costs ~0.1 µs per token); a batch
    without penalties never touches its token histories and gets a cached, read-only all ``-1``
    array instead of an ``S * H`` memset. Every other array is fresh each call and nothing is
    mutated after it is returned, so an asynchronous host→device copy of an earlier result can
    never see it change.

    Args:
      rows: one ``SamplingRow`` per real sequence, in batch order.
      num_seqs: S, the padded row count (``len(rows) <= S``).
      hist_len: H, the history capacity; a row's history must fit in it.
      num_banned: NB, the banned-id capacity; a row's banned ids must fit in it.

    Returns:
      A ``SamplingMetadata`` whose fields are numpy arrays with the documented dtypes and shapes.

    Raises:
      ValueError: naming the field, when a value is out of its allowed range or does not fit.
    """
    n = len(rows)
    if n > num_seqs:
        raise ValueError(f"rows: at most num_seqs={num_seqs} rows allowed, got {n}")
    if hist_len < 0 or num_banned < 0:
        raise ValueError(f"hist_len/num_banned: must be >= 0, got {hist_len}/{num_banned}")

    # One C-level pass over the rows for all scalar fields: table f64[n, len(_SCALARS)].
    table = np.array([_get_scalars(r) for r in rows], dtype=np.float64).reshape(n, len(_SCALARS))

    def col(j: int, dtype, pad) -> np.ndarray:
        out = np.full(num_seqs, pad, dtype=dtype)
        vals = table[:, j]
        if np.issubdtype(dtype, np.integer):  # e.g. a huge top_k: saturate instead of wrapping
            vals = np.clip(vals, -2**31, 2**31 - 1)
        out[:n] = vals
        return out

    temperature = col(0, np.float32, 0.0)
    top_k = col(1, np.int32, 0)
    top_p = col(2, np.float32, 1.0)
    min_p = col(3, np.float32, 0.0)
    presence = col(4, np.float32, 0.0)
    frequency = col(5, np.float32, 0.0)
    repetition = col(6, np.float32, 1.0)
    steps = col(7, np.int32, 0)
    prompt_lens = col(8, np.int32, 0)
    seeds = np.zeros(num_seqs, dtype=np.uint32)
    # Python ints of any size → u32 (two's complement, so negative seeds are allowed too).
    seeds[:n] = np.fromiter((r.seed & 0xFFFFFFFF for r in rows), dtype=np.uint32, count=n)

    _check("temperature", ~(temperature >= 0), temperature, ">= 0")
    _check("top_k", top_k < 0, top_k, ">= 0 (0 disables)")
    _check("top_p", ~((top_p > 0) & (top_p <= 1)), top_p, "in (0, 1]")
    _check("min_p", ~((min_p >= 0) & (min_p <= 1)), min_p, "in [0, 1]")
    _check("repetition_penalty", ~(repetition > 0), repetition, "> 0")
    _check("presence_penalty", ~np.isfinite(presence), presence, "finite")
    _check("frequency_penalty", ~np.isfinite(frequency), frequency, "finite")
    _check("step", steps < 0, steps, ">= 0")
    _check("prompt_len", prompt_lens < 0, prompt_lens, ">= 0")

    uses_penalty = (presence != 0) | (frequency != 0) | (repetition != 1)
    sampled = temperature >= SAMPLING_EPS
    uses_top_k_top_p = sampled & ((top_k > 0) | (top_p < 1))

    penalty_rows = np.flatnonzero(uses_penalty[:n])
    if len(penalty_rows) == 0:
        hist_ids = _empty_history(num_seqs, hist_len)  # shared, read-only: no S*H memset
    else:
        hist_ids = np.full((num_seqs, hist_len), -1, dtype=np.int32)
    for i in penalty_rows:
        ids = rows[i].token_ids
        ids = (np.asarray(ids, dtype=np.int32) if isinstance(ids, np.ndarray)
               else np.fromiter(ids, dtype=np.int32, count=len(ids)))
        if ids.ndim != 1 or ids.size > hist_len:
            raise ValueError(f"token_ids: row {i} has {ids.size} tokens, at most hist_len={hist_len} allowed")
        if prompt_lens[i] > ids.size:
            raise ValueError(f"prompt_len: row {i} must be in [0, {ids.size}], got {prompt_lens[i]}")
        hist_ids[i, :ids.size] = ids

    banned_ids = np.full((num_seqs, num_banned), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        if len(r.banned_ids):
            if len(r.banned_ids) > num_banned:
                raise ValueError(f"banned_ids: row {i} has {len(r.banned_ids)} ids, "
                                 f"at most num_banned={num_banned} allowed")
            banned_ids[i, :len(r.banned_ids)] = r.banned_ids

    return SamplingMetadata(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
        seeds=seeds, steps=steps, hist_ids=hist_ids, prompt_lens=prompt_lens,
        banned_ids=banned_ids, any_penalties=np.asarray(uses_penalty.any()),
        any_top_k_top_p=np.asarray(uses_top_k_top_p.any()), any_logprobs=np.asarray(True))
