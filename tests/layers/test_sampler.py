"""On-device sampler against numpy references (tiny shapes; a few jit compiles in total)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm.layers import sampler
from jaxllm.layers.sampling_metadata import SamplingRow, build_sampling_metadata

V = 64          # vocab of most tests
H = 24          # history capacity
NB = 4          # banned-id capacity
K = 5           # num_logprobs

sample = jax.jit(sampler.sample, static_argnames=("num_logprobs",))
filter_logits = jax.jit(sampler.filter_logits)
apply_penalties = jax.jit(sampler.apply_penalties)


def bucket(n):
    """Few padded batch sizes, so each jitted function compiles at most twice."""
    return 8 if n <= 8 else 64


def md_of(rows, s=None, h=H, nb=NB):
    return build_sampling_metadata(rows, bucket(len(rows)) if s is None else s, h, nb)


def pad(logits, s=None):
    s = bucket(len(logits)) if s is None else s
    return np.concatenate([logits, np.zeros((s - len(logits), logits.shape[1]), logits.dtype)])


def run(logits, rows, k=K):
    """sample() on a padded batch; returns numpy (token_ids, logprobs, top_ids, top_logprobs)."""
    out = sample(pad(logits), md_of(rows), num_logprobs=k)
    return tuple(np.asarray(x)[:len(rows)] for x in (out.token_ids, out.logprobs, out.top_ids,
                                                     out.top_logprobs))


# ----------------------------------------------------------------------------- numpy references

def ref_penalties(logits, row: SamplingRow):
    """vLLM apply_penalties for one row, written with Python loops."""
    out = logits.astype(np.float64).copy()
    hist = list(row.token_ids)
    prompt, output = hist[:row.prompt_len], hist[row.prompt_len:]
    for t in set(prompt) | set(output):
        out[t] = out[t] / row.repetition_penalty if out[t] > 0 else out[t] * row.repetition_penalty
    for t in set(output):
        out[t] -= row.frequency_penalty * output.count(t) + row.presence_penalty
    return out


def ref_keep(logits, temperature, top_k, top_p, min_p):
    """The set of tokens with non-zero probability (bool[V]) for a sampled row."""
    x = logits.astype(np.float64) / temperature
    keep = np.isfinite(x)
    if 0 < top_k < len(x):
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-x, kind="stable")
        mass, cutoff = 0.0, None
        for t in order:  # walk down until the kept mass reaches p
            if not keep[t]:
                break
            cutoff = x[t]
            mass += probs[t]
            if mass >= top_p:
                break
        keep &= x >= cutoff  # ties with the last kept token stay
    if min_p > 0.0:
        probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        keep &= probs >= min_p * probs.max()
    return keep


def ref_probs(logits, temperature, top_k, top_p, min_p):
    keep = ref_keep(logits, temperature, top_k, top_p, min_p)
    x = logits.astype(np.float64) / temperature
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    return p / p.sum()


# ----------------------------------------------------------------------------- filters

FILTER_CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.5, 0.0),
    (1.3, 0, 0.9, 0.0), (1.0, 10, 0.8, 0.0), (0.5, 0, 1.0, 0.1), (1.0, 20, 0.95, 0.05),
    (2.0, 3, 0.3, 0.5), (1.0, V + 10, 0.99, 0.0), (0.8, 0, 0.05, 0.0), (1.0, 0, 1.0, 1.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_masks_match_numpy(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((len(FILTER_CASES), V)) * 3).astype(np.float32)
    rows = [SamplingRow(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in FILTER_CASES]
    got = np.isfinite(np.asarray(filter_logits(pad(logits, 16), md_of(rows, s=16))))
    for i, (t, k, p, m) in enumerate(FILTER_CASES):
        want = ref_keep(logits[i], t, k, p, m)
        np.testing.assert_array_equal(got[i], want, err_msg=f"case {FILTER_CASES[i]}")
        assert want.sum() >= 1
        if 0 < k < V and p == 1.0 and m == 0.0:
            assert want.sum() == k  # continuous random logits: no ties


def test_top_k_top_p_boundaries_and_ties():
    # Probabilities are powers of two, so softmax and its cumulative sums are exact in f32:
    # probs [1/2, 1/4, 1/8, 1/8, ~0].
    probs = np.array([0.5, 0.25, 0.125, 0.125, 1e-9])
    logits = np.full((8, V), -1e9, np.float32)
    logits[:, :5] = np.log(probs)
    cases = [  # (top_k, top_p, kept ids)
        (0, 0.5, [0]),           # mass exactly p after one token: the smallest set stops there
        (0, 0.75, [0, 1]),
        (0, 0.76, [0, 1, 2, 3]),  # needs the first 1/8 token; its tie comes along
        (0, 1e-6, [0]),          # always at least one token
        (2, 1.0, [0, 1]),
        (3, 1.0, [0, 1, 2, 3]),  # the 3rd largest is tied with the 4th: both kept
        (3, 0.9, [0, 1, 2, 3]),  # top-p over the top-k-renormalized distribution
        (3, 0.55, [0, 1]),       # ...which includes the tied 4th token (1/2 < 0.55, not 4/7)
    ]
    rows = [SamplingRow(top_k=k, top_p=p) for k, p, _ in cases]
    keep = np.isfinite(np.asarray(filter_logits(pad(logits, 16), md_of(rows, s=16))))
    for i, (k, p, kept) in enumerate(cases):
        # (ref_keep works in float64, where these boundaries are not exact: compare to the lists.)
        assert np.flatnonzero(keep[i]).tolist() == kept, cases[i]


def test_disabled_filters_are_noops_when_flag_forced_on():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((8, V)).astype(np.float32)
    rows = [SamplingRow(temperature=0.9, seed=i, step=7) for i in range(8)]
    md = md_of(rows)
    assert not md.any_top_k_top_p
    forced = md_of(rows)
    forced.any_top_k_top_p = np.asarray(True)
    forced.any_penalties = np.asarray(True)
    np.testing.assert_array_equal(np.asarray(filter_logits(logits, md)),
                                  np.asarray(filter_logits(logits, forced)))
    np.testing.assert_array_equal(np.asarray(sample(logits, md, num_logprobs=K).token_ids),
                                  np.asarray(sample(logits, forced, num_logprobs=K).token_ids))


DIST_CASES = [(1.0, 0, 1.0, 0.0), (0.7, 4, 1.0, 0.0), (1.0, 0, 0.7, 0.0), (1.5, 6, 0.9, 0.1)]


@pytest.mark.parametrize("case", DIST_CASES)
def test_sampling_frequencies_follow_filtered_distribution(case):
    t, k, p, m = case
    v, n = 8, 4000
    logits1 = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    logits = np.broadcast_to(logits1, (n, v)).copy()
    rows = [SamplingRow(temperature=t, top_k=k, top_p=p, min_p=m, seed=1234, step=i) for i in range(n)]
    toks = np.asarray(sample(logits, md_of(rows, s=n, h=1, nb=1), num_logprobs=0).token_ids)
    counts = np.bincount(toks, minlength=v)
    probs = ref_probs(logits1, t, k, p, m)
    assert counts[probs == 0].sum() == 0, (counts, probs)
    expected = probs[probs > 0] * n
    chi2 = ((counts[probs > 0] - expected) ** 2 / expected).sum()
    # df <= 7; P(chi2 > 30) < 1e-4. Fixed seeds make this deterministic.
    assert chi2 < 30.0, (chi2, counts, expected)


# ----------------------------------------------------------------------------- penalties

def _penalty_rows(rng, n):
    rows = []
    for i in range(n):
        plen, olen = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        hist = rng.integers(0, 12, plen + olen).tolist()  # small id range: many repeats
        rows.append(SamplingRow(
            temperature=0.0, presence_penalty=float(rng.uniform(-2, 2)),
            frequency_penalty=float(rng.uniform(-2, 2)),
            repetition_penalty=float(rng.choice([1.0, 0.5, 1.3, 2.0])),
            token_ids=hist, prompt_len=plen))
    return rows


def test_penalties_match_numpy():
    rng = np.random.default_rng(4)
    rows = _penalty_rows(rng, 6) + [SamplingRow(temperature=0.0, token_ids=[1, 2, 3], prompt_len=1)]
    logits = (rng.standard_normal((len(rows), V)) * 2).astype(np.float32)
    md = md_of(rows)
    got = np.asarray(apply_penalties(pad(logits), md))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_penalties(logits[i], r), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[len(rows) - 1], logits[-1])  # penalties disabled: untouched
    # Through sample(): greedy rows take the argmax of the penalized logits.
    toks = run(logits, rows)[0]
    want = [int(np.argmax(ref_penalties(logits[i], r))) for i, r in enumerate(rows)]
    np.testing.assert_array_equal(toks, want)


def test_penalty_builder_only_copies_history_of_penalty_rows():
    rows = [SamplingRow(token_ids=[5, 6], prompt_len=1),
            SamplingRow(token_ids=[7, 8, 9], prompt_len=2, frequency_penalty=0.5)]
    md = md_of(rows, s=4)
    assert bool(md.any_penalties)
    assert (md.hist_ids[0] == -1).all() and (md.hist_ids[2:] == -1).all()
    np.testing.assert_array_equal(md.hist_ids[1, :4], [7, 8, 9, -1])
    assert not bool(md_of(rows[:1]).any_penalties)


# ----------------------------------------------------------------------------- greedy / logprobs

def test_greedy_is_argmax_unaffected_by_seed_and_logprobs_are_raw():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((6, V)) * 2).astype(np.float32)
    rows_a = [SamplingRow(temperature=0.0, seed=i, step=i) for i in range(3)] + [
        SamplingRow(temperature=1.0, top_k=3, seed=i) for i in range(3)]
    rows_b = [SamplingRow(temperature=0.0, seed=100 + i, step=50, top_k=2, top_p=0.3) for i in range(3)] + [
        SamplingRow(temperature=0.8, seed=7 + i, min_p=0.2) for i in range(3)]
    out_a = run(logits, rows_a)
    out_b = run(logits, rows_b)
    greedy = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(out_a[0][:3], greedy[:3])
    np.testing.assert_array_equal(out_b[0][:3], greedy[:3])
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for out in (out_a, out_b):
        toks, logprobs, top_ids, top_logprobs = out
        np.testing.assert_allclose(logprobs, raw[np.arange(6), toks], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(top_ids, np.argsort(-raw, axis=-1, kind="stable")[:, :K])
        np.testing.assert_allclose(top_logprobs,
                                   np.take_along_axis(raw, top_ids, axis=-1), rtol=1e-6, atol=1e-6)
    assert out_a[2].dtype == np.int32 and out_a[0].dtype == np.int32


def test_all_greedy_batch_and_zero_logprobs():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((8, V)).astype(np.float32)
    out = sample(logits, md_of([SamplingRow(temperature=0.0)] * 3), num_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(logits, axis=-1))
    assert out.top_ids.shape == (8, 0) and out.top_logprobs.shape == (8, 0)


# ----------------------------------------------------------------------------- seeds / batching

def test_row_token_independent_of_batch_composition():
    rng = np.random.default_rng(7)
    probe_rows = [
        SamplingRow(temperature=1.0, seed=42, step=3),
        SamplingRow(temperature=0.7, top_k=8, top_p=0.9, seed=2**32 - 1, step=0),
        SamplingRow(temperature=1.2, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.2,
                    token_ids=[1, 2, 2, 3], prompt_len=2, seed=9, step=11, banned_ids=[0]),
    ]
    probe_logits = rng.standard_normal((len(probe_rows), V)).astype(np.float32)
    for j, row in enumerate(probe_rows):
        tokens = set()
        for size, pos in [(1, 0), (3, 2), (8, 5), (40, 39), (64, 17)]:
            logits = rng.standard_normal((size, V)).astype(np.float32)
            logits[pos] = probe_logits[j]
            others = [SamplingRow(temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(0, 5)),
                                  seed=int(rng.integers(0, 1000)), step=int(rng.integers(0, 9)))
                      for _ in range(size)]
            others[pos] = row
            tokens.add(int(run(logits, others)[0][pos]))
        assert len(tokens) == 1, (j, tokens)


def test_seed_and_step_change_the_draw():
    logits = np.zeros((64, V), np.float32)  # uniform: every draw equally likely
    same = [SamplingRow(seed=5, step=2)] * 64
    diff_step = [SamplingRow(seed=5, step=i) for i in range(64)]
    diff_seed = [SamplingRow(seed=i, step=2) for i in range(64)]
    t_same = run(logits, same)[0]
    assert len(set(t_same.tolist())) == 1
    for rows in (diff_step, diff_seed):
        toks = run(logits, rows)[0]
        assert len(set(toks.tolist())) > 20


# ----------------------------------------------------------------------------- banned ids

def test_banned_ids_never_sampled():
    n = 64
    logits = np.zeros((n, V), np.float32)
    logits[:, 3] = 10.0   # by far the most likely token
    logits[:, 9] = 9.0    # the next one
    rows = [SamplingRow(temperature=float(t), seed=i, step=i, banned_ids=[3, 9])
            for i, t in enumerate(np.linspace(0.0, 3.0, n))]
    toks = run(logits, rows)[0]
    assert not np.isin(toks, [3, 9]).any()
    assert toks[0] not in (3, 9) and len(set(toks.tolist())) > 5
    unbanned = [SamplingRow(temperature=0.0, banned_ids=[9])]
    assert int(run(logits[:1], unbanned)[0][0]) == 3


# ----------------------------------------------------------------------------- jit / builder

def test_no_recompilation_for_new_values():
    traces = []

    @jax.jit
    def step(logits, md):
        traces.append(1)
        return sampler.sample(logits, md, num_logprobs=K)

    rng = np.random.default_rng(8)
    for i in range(4):
        rows = [SamplingRow(temperature=float(i % 2), top_k=i, top_p=1.0 - 0.1 * i,
                            presence_penalty=0.1 * i, seed=i, step=i, token_ids=[i], prompt_len=0,
                            banned_ids=[i] * (i % 2))] * 3
        step(rng.standard_normal((4, V)).astype(np.float32), md_of(rows, s=4))  # own jit: own shapes
    assert len(traces) == 1


def test_builder_padding_and_validation():
    md = md_of([SamplingRow(temperature=0.5, top_k=10**12, seed=-1, step=3)], s=3)
    assert md.temperature.dtype == np.float32 and md.seeds.dtype == np.uint32
    assert md.top_k[0] == 2**31 - 1 and md.seeds[0] == 2**32 - 1
    np.testing.assert_array_equal(md.temperature[1:], 0.0)      # padding rows are greedy
    np.testing.assert_array_equal(md.top_p[1:], 1.0)
    np.testing.assert_array_equal(md.repetition_penalty[1:], 1.0)
    assert md.hist_ids.shape == (3, H) and md.banned_ids.shape == (3, NB)
    assert md.any_penalties.shape == () and not md.any_penalties
    assert not md_of([SamplingRow(temperature=0.0, top_k=5)]).any_top_k_top_p  # greedy: no sort
    assert md_of([SamplingRow(temperature=0.5, top_p=0.5)]).any_top_k_top_p
    bad = [({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"),
           ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
           ({"banned_ids": [1] * (NB + 1)}, "banned_ids"),
           ({"frequency_penalty": 1.0, "token_ids": [1] * (H + 1)}, "token_ids"),
           ({"frequency_penalty": 1.0, "token_ids": [1], "prompt_len": 2}, "prompt_len")]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=f"^{field}"):
            md_of([SamplingRow(**kwargs)])
    with pytest.raises(ValueError, match="^rows"):
        md_of([SamplingRow()] * 3, s=2)


def test_row_from_request_bans_stop_ids_until_min_tokens():
    from jaxllm.request import Request
    from jaxllm.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0.5, top_k=4, min_tokens=2, stop_token_ids=[7], seed=3)
    req = Request("r", [1, 2, 3], sp, max_tokens=8, eos_token_ids=frozenset({0}))
    row = SamplingRow.from_request(req, seed=3)
    assert sorted(row.banned_ids) == [0, 7] and row.step == 0 and row.prompt_len == 3
    req.append_output_token_ids([5, 6])
    row = SamplingRow.from_request(req, seed=3)
    assert list(row.banned_ids) == [] and row.step == 2 and list(row.token_ids) == [1, 2, 3, 5, 6]
    sp_ignore = SamplingParams(min_tokens=1, ignore_eos=True)
    req2 = Request("s", [1], sp_ignore, max_tokens=4, eos_token_ids=frozenset({0}))
    assert list(SamplingRow.from_request(req2, seed=0).banned_ids) == []
