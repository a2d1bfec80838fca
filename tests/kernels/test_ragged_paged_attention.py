"""Ragged paged attention: one parameterized test class, re-run per backend that runs here.

Every backend is called through the public dispatcher and compared, on the real tokens only,
with our pure-jnp reference and with JAX's own ``ref_ragged_paged_attention``, both computed on
a *clean* copy of the cache. The backend itself gets a *poisoned* copy: every page a sequence
does not own, every slot past ``kv_len`` in its last page, every slot before its sliding window
and every padding row of ``q`` is garbage (NaN where the dtype has one), so the result must not
depend on memory the sequence does not own.

The reference runs the full cross-product page size x head_dim x GQA x batch; interpreted
kernels run a pairwise-covering subset (interpret mode is slow).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
    ref_ragged_paged_attention as jax_ref_ragged_paged_attention,
)

from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import (backends_for_platform, load_kernel,
                                                   platform_info, resolve_backend)
from pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

NUM_KV_HEADS = 2
T_PAD = 40       # token bucket; the batches below use at most 31 tokens
S_PAD = 8        # sequence bucket; the batches use at most 4 sequences
MAX_KV = 160     # longest context any batch uses (rounded up)
# name -> (q_lens, kv_lens) of the real sequences.
BATCHES = {
    "decode": ([1, 1, 1, 1], [5, 37, 70, 150]),
    "prefill": ([7, 20, 1], [7, 20, 1]),
    "mixed": ([1, 9, 1, 16], [40, 9, 3, 50]),
    "chunked_long_context": ([1, 30], [33, 150]),
    "few_real_seqs": ([3], [17]),
}
PAGE_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128)
GQA = (1, 4, 8)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: str = "mixed"
    page_size: int = 16
    head_dim: int = 64
    gqa: int = 4
    q_dtype: str = "float32"
    kv_dtype: str = "float32"      # float32 | bfloat16 | float8_e4m3fn | int8
    sliding_window: int | None = None
    soft_cap: float | None = None

    @property
    def id(self) -> str:
        return "-".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                        if v != getattr(Case, k) or k in ("batch", "page_size", "head_dim", "gqa"))


def _pairwise(factors, candidates):
    """Greedy subset of ``candidates`` (rows of factor values) covering every value pair of any
    two factors that the candidates cover."""
    pairs = lambda r: {(i, r[i], j, r[j]) for i, j in itertools.combinations(range(len(r)), 2)}
    need = set().union(*(pairs(r) for r in candidates))
    rows = []
    while need:
        best = max(candidates, key=lambda r: len(pairs(r) & need))
        need -= pairs(best)
        rows.append(best)
    return rows


FACTORS = (PAGE_SIZES, HEAD_DIMS, GQA, list(BATCHES))
FULL = [Case(b, p, d, g) for p, d, g, b in itertools.product(*FACTORS)]
# Interpreted kernels compile once per (page size, head_dim, GQA): pick few such configs that
# cover every pair of them, then batches so that every pair of all four factors is covered.
_CONFIGS = _pairwise(FACTORS[:3], list(itertools.product(*FACTORS[:3])))
PAIRWISE = sorted((Case(b, p, d, g) for p, d, g, b in
                   _pairwise(FACTORS, [c + (b,) for c in _CONFIGS for b in BATCHES])),
                  key=lambda c: (c.page_size, c.head_dim, c.gqa))
FEATURES = [
    Case("mixed", sliding_window=5),
    Case("chunked_long_context", page_size=32, sliding_window=40),
    Case("mixed", soft_cap=2.0),
    Case("chunked_long_context", sliding_window=24, soft_cap=3.0, gqa=8),
    Case("mixed", kv_dtype="float8_e4m3fn"),
    Case("chunked_long_context", page_size=32, gqa=1, kv_dtype="int8"),
    Case("decode", kv_dtype="int8", head_dim=128),
    Case("mixed", q_dtype="bfloat16", kv_dtype="bfloat16"),
]
# Interpreted kernels: one compile per feature case, so combine the cheap-to-combine ones.
FEATURES_INTERPRET = [FEATURES[i] for i in (0, 2, 3, 4, 5, 7)]
JAX_CHECKED = frozenset(PAIRWISE + FEATURES)
K_SCALE, V_SCALE = 0.05, 0.02
# float32 matmuls run at reduced precision by default on GPU (TF32) and TPU (bf16 passes).
TOL = {"float32": 1e-4 if jax.devices()[0].platform == "cpu" else 3e-3, "bfloat16": 3e-2}


def build(case: Case, poison: float, seed: int = 0):
    """Random batch for ``case``: (args, clean kv_pages, poisoned kv_pages, kwargs, num real tokens)."""
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = BATCHES[case.batch]
    n, ps, d = len(q_lens), case.page_size, case.head_dim
    pages_per_seq = -(-MAX_KV // ps) + 1
    used = [-(-kv // ps) for kv in kv_lens]
    # Same shapes for every batch (one compile per config); >= 4 pages nobody owns.
    num_pages = max(sum(-(-kv // ps) for kv in b[1]) for b in BATCHES.values()) + 4
    perm = rng.permutation(num_pages)
    spare = perm[sum(used):]
    page_indices = rng.choice(spare, size=(S_PAD, pages_per_seq)).astype(np.int32)
    clean = rng.standard_normal((num_pages, ps, 2 * NUM_KV_HEADS, d)).astype(np.float32)
    owned = np.zeros((num_pages, ps), bool)            # slots some query may read
    start = 0
    for i, (ql, kv) in enumerate(zip(q_lens, kv_lens)):
        page_indices[i, :used[i]] = perm[start:start + used[i]]
        start += used[i]
        first = 0 if case.sliding_window is None else max(kv - ql - case.sliding_window + 1, 0)
        for pos in range(first, kv):
            owned[page_indices[i, pos // ps], pos % ps] = True

    kwargs = dict(sm_scale=d ** -0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    if case.kv_dtype in ("float8_e4m3fn", "int8"):
        scale = np.where(np.arange(2 * NUM_KV_HEADS) % 2 == 0, K_SCALE, V_SCALE)[:, None]
        clean = clean / scale
        if case.kv_dtype == "int8":
            clean = np.clip(np.round(clean * 3), -127, 127)  # use the int8 range
            scale = scale / 3
            kwargs.update(k_scale=K_SCALE / 3, v_scale=V_SCALE / 3)
        else:
            kwargs.update(k_scale=K_SCALE, v_scale=V_SCALE)
    kv_dtype = jnp.dtype(case.kv_dtype)
    clean = jnp.asarray(clean).astype(kv_dtype)
    garbage = poison if jnp.issubdtype(kv_dtype, jnp.floating) else 127
    poisoned = jnp.where(jnp.asarray(owned)[:, :, None, None], clean,
                         jnp.asarray(garbage, jnp.float32).astype(kv_dtype))

    n_tok = sum(q_lens)
    cu = np.full(S_PAD + 1, n_tok, np.int32)
    cu[:n + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    kv_arr = np.zeros(S_PAD, np.int32)
    kv_arr[:n] = kv_lens
    q = rng.standard_normal((T_PAD, NUM_KV_HEADS * case.gqa, d)).astype(np.float32)
    q[n_tok:] = poison                                 # padding rows
    q = jnp.asarray(q, jnp.dtype(case.q_dtype))
    args = (q, kv_arr, page_indices, cu, np.array([n], np.int32))
    args = tuple(jnp.asarray(a) for a in args)
    return args, clean, poisoned, kwargs, n_tok


# Test-side programs are small and run once: skip XLA's backend optimizations (compile time).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_jit_ref = jax.jit(ref_ragged_paged_attention, compiler_options=_FAST_COMPILE,
                   static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale"))


@functools.lru_cache(maxsize=None)
def truths(case: Case, seed: int = 0, jax_check: bool | None = None):
    """Our reference on the clean cache, real tokens only, and (for cases in JAX_CHECKED) JAX's
    ``ref_ragged_paged_attention`` too, asserted equal to ours. JAX's reference unrolls a Python
    loop over sequences and costs seconds of compile per case, so it checks our reference on a
    pairwise-covering subset; the full cross-product compares with ours (itself checked)."""
    args, clean, _, kwargs, n_tok = build(case, 0.0, seed)
    q, kv_lens, page_indices, cu, num_seqs = args
    with jax.default_matmul_precision("highest"):
        ours = _jit_ref(q, clean, kv_lens, page_indices, cu, num_seqs, **kwargs)
    ours = np.asarray(ours[:n_tok], np.float32)
    if not (case in JAX_CHECKED if jax_check is None else jax_check):
        return ours, None
    # Close over the concrete lengths so its data-dependent slices compile to one program.
    lens = tuple(np.asarray(a) for a in (kv_lens, cu, num_seqs))
    jax_ref = jax.jit(lambda q, kv, pi: jax_ref_ragged_paged_attention(
        q, kv, lens[0], pi, lens[1], lens[2], **kwargs), compiler_options=_FAST_COMPILE)
    with jax.default_matmul_precision("highest"):
        theirs = jax_ref(q, clean, page_indices)
    theirs = np.asarray(theirs, np.float32)
    tol = TOL[case.q_dtype]
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=tol, err_msg="reference vs JAX's")
    return ours, theirs


@functools.lru_cache(maxsize=None)
def _public_call(backend: str, interpret: bool, kwargs: tuple):
    """The public entry point, jitted once per option set (fast-compile: interpreted kernels are
    big programs of callbacks, where XLA's backend optimizations cost more than they save)."""
    return jax.jit(functools.partial(ragged_paged_attention, backend=backend, interpret=interpret,
                                     **dict(kwargs)), compiler_options=_FAST_COMPILE)


class RaggedPagedAttentionTest:
    """Base class: subclasses set BACKEND / INTERPRET / CASES; pytest collects ``Test*`` only."""

    BACKEND = "reference"
    INTERPRET = False
    POISON = float("nan")
    CASES: list[Case] = FULL
    FEATURE_CASES: list[Case] = FEATURES
    HALF_ONLY = False  # backend takes only 16-bit q: float32 cases run in bfloat16

    @pytest.fixture(autouse=True)
    def _skip_if_unavailable(self):
        try:
            if resolve_backend(self.BACKEND, self.INTERPRET) != "reference":
                load_kernel(self.BACKEND)  # e.g. jax_triton missing on this GPU host
        except ValueError as e:
            pytest.skip(str(e))

    def run_backend(self, case: Case, args, kv_pages, kwargs):
        q, kv_lens, page_indices, cu, num_seqs = args
        fn = _public_call(self.BACKEND, self.INTERPRET, tuple(sorted(kwargs.items())))
        return fn(q, kv_pages, kv_lens, page_indices, cu, num_seqs)

    def check(self, case: Case, seed: int = 0):
        jax_check = case in JAX_CHECKED
        if self.HALF_ONLY:
            case = dataclasses.replace(case, q_dtype="bfloat16", kv_dtype=case.kv_dtype.replace(
                "float32", "bfloat16"))
        args, clean, poisoned, kwargs, n_tok = build(case, self.POISON, seed)
        ours, theirs = truths(case, seed, jax_check)
        out = self.run_backend(case, args, poisoned, kwargs)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        out = np.asarray(out[:n_tok], np.float32)
        assert np.isfinite(out).all(), "result depends on memory the sequence does not own"
        tol = TOL[case.q_dtype]
        np.testing.assert_allclose(out, ours, atol=tol, rtol=tol, err_msg="vs reference")
        if theirs is not None:
            np.testing.assert_allclose(out, theirs, atol=tol, rtol=tol, err_msg="vs JAX's reference")

    def test_shapes_and_batches(self, case_idx):
        self.check(self.CASES[case_idx])

    def test_features(self, feature_idx):
        self.check(self.FEATURE_CASES[feature_idx])


def pytest_generate_tests(metafunc):
    """Parametrize ``case_idx`` over each subclass's own CASES list (ids name the case)."""
    for name, attr in (("case_idx", "CASES"), ("feature_idx", "FEATURE_CASES")):
        if name in metafunc.fixturenames:
            cases = getattr(metafunc.cls, attr)
            metafunc.parametrize(name, range(len(cases)), ids=[c.id for c in cases])


class TestReference(RaggedPagedAttentionTest):
    BACKEND = "reference"


class TestMosaicTpuInterpret(RaggedPagedAttentionTest):
    BACKEND = "mosaic_tpu"
    INTERPRET = True
    CASES = PAIRWISE
    FEATURE_CASES = FEATURES_INTERPRET

    def test_small_blocks(self, bq=8, pages_per_blk=3):
        """Several q blocks per sequence and several KV blocks (double buffering) per q block."""
        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_mosaic_tpu

        case = Case("chunked_long_context", sliding_window=70)
        args, clean, poisoned, kwargs, n_tok = build(case, self.POISON, seed=1)
        ours, _ = truths(case, seed=1)
        q, kv_lens, page_indices, cu, num_seqs = args
        out = ragged_paged_attention_mosaic_tpu(
            q, poisoned, kv_lens, page_indices, cu, num_seqs, interpret=True,
            num_queries_per_block=bq, num_kv_pages_per_block=pages_per_blk, **kwargs)
        np.testing.assert_allclose(np.asarray(out[:n_tok]), ours, atol=1e-4, rtol=1e-4)


    @pytest.mark.parametrize("case", [Case("mixed", 16, 128, 4, q_dtype="bfloat16",
                                           kv_dtype="bfloat16"),
                                      Case("mixed", 32, 64, 8, kv_dtype="int8", sliding_window=8,
                                           soft_cap=2.0)], ids=lambda c: c.id)
    def test_lowers_to_mosaic(self, case, monkeypatch):
        """The Pallas -> Mosaic TPU lowering accepts the kernel (block shapes, ops) on CPU by
        pretending to be a v5e. Mosaic's own compiler passes still need a TPU to run."""
        from jax._src.pallas.mosaic import tpu_info  # private: skip if it moves
        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_mosaic_tpu

        if not hasattr(tpu_info, "get_device_kind"):
            pytest.skip("jax internals changed: cannot fake a TPU device kind")
        monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
        monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
        args, clean, _, kwargs, _ = build(case, 0.0)
        q, kv_lens, page_indices, cu, num_seqs = args
        lowered = ragged_paged_attention_mosaic_tpu.trace(
            q, clean, kv_lens, page_indices, cu, num_seqs, **kwargs).lower(
                lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()


class TestMosaicTpu(RaggedPagedAttentionTest):
    """Compiled Mosaic TPU kernel: runs on a TPU host only."""
    BACKEND = "mosaic_tpu"
    CASES = PAIRWISE
    FEATURE_CASES = FEATURES_INTERPRET


class TestMosaicGpu(RaggedPagedAttentionTest):
    """Hopper Mosaic GPU kernel (no interpreter): runs on a compute capability >= 9.0 GPU only."""
    BACKEND = "mosaic_gpu"
    CASES = PAIRWISE
    HALF_ONLY = True


class TestTriton(RaggedPagedAttentionTest):
    """Triton kernel via jax_triton (no interpreter): runs on a GPU only."""
    BACKEND = "triton"
    CASES = PAIRWISE


def test_pairwise_subset_covers_every_pair():
    rows = [(c.page_size, c.head_dim, c.gqa, c.batch) for c in PAIRWISE]
    for i, j in itertools.combinations(range(4), 2):
        assert {(r[i], r[j]) for r in rows} == set(itertools.product(FACTORS[i], FACTORS[j]))
    assert len({r[:3] for r in rows}) < len(HEAD_DIMS) * len(PAGE_SIZES) * len(GQA)


def test_auto_backend_matches_platform():
    assert resolve_backend("auto") in backends_for_platform(*platform_info())
    if jax.devices()[0].platform == "cpu":
        assert resolve_backend("auto") == "reference"
    assert backends_for_platform("cpu") == ("reference",)
    assert backends_for_platform("tpu")[0] == "mosaic_tpu"
    assert backends_for_platform("gpu", 9.0)[:2] == ("triton", "mosaic_gpu")   # triton measured faster
    assert backends_for_platform("gpu", 8.0)[0] == "triton"


def _tiny_args(**over):
    """Valid tiny inputs (2 seqs, 4 tokens), with some replaced."""
    args = dict(q=jnp.zeros((4, 4, 16)), kv_pages=jnp.zeros((3, 4, 4, 16)),
                kv_lens=jnp.array([3, 1], jnp.int32), page_indices=jnp.zeros((2, 2), jnp.int32),
                cu_q_lens=jnp.array([0, 3, 4], jnp.int32), num_seqs=jnp.array([2], jnp.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("field,over,kwargs", [
    ("q:", dict(q=jnp.zeros((4, 64))), {}),
    ("q:", dict(q=jnp.zeros((4, 3, 16))), {}),                       # 3 q heads, 2 kv heads
    ("q:", dict(q=jnp.zeros((4, 4, 16), jnp.int32)), {}),
    ("kv_pages:", dict(kv_pages=jnp.zeros((3, 4, 3, 16))), {}),      # odd combined heads
    ("kv_pages:", dict(kv_pages=jnp.zeros((3, 4, 4, 32))), {}),      # head_dim mismatch
    ("kv_pages:", dict(kv_pages=jnp.zeros((3, 4, 4, 16), jnp.int32)), {}),
    ("page_indices:", dict(page_indices=jnp.zeros((2,), jnp.int32)), {}),
    ("kv_lens:", dict(kv_lens=jnp.array([3, 1, 0], jnp.int32)), {}),
    ("kv_lens:", dict(kv_lens=jnp.array([3.0, 1.0])), {}),
    ("cu_q_lens:", dict(cu_q_lens=jnp.array([0, 3], jnp.int32)), {}),
    ("num_seqs:", dict(num_seqs=jnp.array([2, 0], jnp.int32)), {}),
    ("sm_scale:", {}, dict(sm_scale=float("nan"))),
    ("sliding_window:", {}, dict(sliding_window=0)),
    ("soft_cap:", {}, dict(soft_cap=-1.0)),
    ("k_scale:", {}, dict(k_scale=0.0)),
    ("v_scale:", {}, dict(v_scale=float("inf"))),
    ("backend:", {}, dict(backend="cuda")),
])
def test_invalid_inputs_raise_naming_the_field(field, over, kwargs):
    kwargs = {"sm_scale": 0.25, "backend": "reference", **kwargs}
    with pytest.raises(ValueError, match=f"^{field}"):
        ragged_paged_attention(**_tiny_args(**over), **kwargs)


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="checks the CPU platform's errors")
@pytest.mark.parametrize("backend,interpret", [("mosaic_tpu", False), ("triton", False),
                                               ("mosaic_gpu", False), ("triton", True)])
def test_backend_that_cannot_run_here_names_platform_and_alternatives(backend, interpret):
    with pytest.raises(ValueError, match=r"cannot run on platform cpu; backends that can: "
                                         r"\('reference',\)"):
        ragged_paged_attention(**_tiny_args(), sm_scale=0.25, backend=backend, interpret=interpret)


def test_auto_runs_and_matches_reference():
    case = Case("mixed", gqa=1, q_dtype="bfloat16", kv_dtype="bfloat16")  # every backend takes it
    args, clean, _, kwargs, n_tok = build(case, 0.0)
    q, kv_lens, page_indices, cu, num_seqs = args
    out = ragged_paged_attention(q, clean, kv_lens, page_indices, cu, num_seqs, **kwargs)
    tol = TOL["bfloat16"]
    np.testing.assert_allclose(np.asarray(out[:n_tok], np.float32), truths(case)[0], atol=tol,
                               rtol=tol)
