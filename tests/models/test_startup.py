"""Start-up cost: dummy weights in few programs, and decoder layers traced once per structure.

Models here are built from in-memory transformers configs (no checkpoint files): ``nnx.eval_shape``
then ``load_dummy``, exactly as ``load_format="dummy"`` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxllm.models import llama, loader
from jaxllm.models.loader import hf_param_map, load_dummy
from jaxllm.models.registry import get_model_class
from tests.models.paged_batch import PagedBatcher

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ, PAD_TOKENS, PAD_SEQS = 4, 24, 6, 16, 4


def _build(arch: str, num_layers: int, dtype=jnp.float32, seed: int = 0, mesh=None, **extra):
    """A dummy-weight model of ``arch`` ("Llama", "Qwen2", "Qwen3") with ``num_layers`` layers."""
    cfg = getattr(transformers, f"{arch}Config")(**_COMMON, num_hidden_layers=num_layers, **extra)
    cfg.architectures = [f"{arch}ForCausalLM"]
    cls = get_model_class(cfg.architectures)
    model = nnx.eval_shape(lambda: cls(cls.model_args(cfg), dtype=dtype, attention_backend="reference"))
    load_dummy(model, seed=seed, mesh=mesh)
    return model


def _params(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.var.get_value().astype(jnp.float32))
            for name, t in hf_param_map(model).items()}


@pytest.fixture(scope="module")
def llama_bf16():
    return _build("Llama", 3, jnp.bfloat16, attention_bias=True, mlp_bias=True)


# ------------------------------------------------------------------ dummy weights
def test_dummy_weights_compile_once_per_layer_structure():
    loader._dummy_group_fn.cache_clear()
    _build("Llama", 2, seed=7)
    two = loader._dummy_group_fn.cache_info()
    _build("Llama", 6, seed=7)
    six = loader._dummy_group_fn.cache_info()
    # One program for the layers and one for the rest, whatever the depth: the 6-layer model
    # reuses both programs of the 2-layer one (same layer shapes) and compiles nothing new.
    assert (two.misses, six.misses) == (2, 2)
    assert six.hits - two.hits == 6 + 1


def test_dummy_weights_dtype_range_norms_biases(llama_bf16):
    half = loader._DUMMY_STD * 3 ** 0.5
    for name, t in hf_param_map(llama_bf16).items():
        value = t.var.get_value()
        assert value.dtype == jnp.bfloat16, name
        x = np.asarray(value.astype(jnp.float32))
        if name.endswith("norm.weight"):
            np.testing.assert_array_equal(x, 1.0, err_msg=name)
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(x, 0.0, err_msg=name)
        else:
            assert np.all(np.abs(x) <= half + 1e-3), name
            assert 0.015 < x.std() < 0.025 and abs(x.mean()) < 2e-3, name


def test_dummy_weights_differ_across_layers_and_seeds(llama_bf16):
    p = _params(llama_bf16)
    q_proj = [p[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)]
    assert not np.array_equal(q_proj[0], q_proj[1]) and not np.array_equal(q_proj[1], q_proj[2])
    # k and v have the same shape and sit in one program: each still gets its own key.
    assert not np.array_equal(p["model.layers.0.self_attn.k_proj.weight"],
                              p["model.layers.0.self_attn.v_proj.weight"])
    again = _params(_build("Llama", 3, jnp.bfloat16, attention_bias=True, mlp_bias=True))
    other = _params(_build("Llama", 3, jnp.bfloat16, seed=1, attention_bias=True, mlp_bias=True))
    name = "model.layers.2.mlp.down_proj.weight"
    np.testing.assert_array_equal(again[name], p[name])
    assert not np.array_equal(other[name], p[name])


def test_dummy_weights_placed_with_their_shardings():
    n = 2 if len(jax.devices()) >= 2 else 1
    mesh = jax.make_mesh((n,), ("model",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharded = _build("Llama", 2, mesh=mesh)
    specs = {name: t.var.get_value().sharding.spec for name, t in hf_param_map(sharded).items()}
    P = jax.sharding.PartitionSpec
    assert specs["model.layers.1.self_attn.q_proj.weight"] == P(None, "model")
    assert specs["model.layers.1.mlp.down_proj.weight"] == P("model", None)
    assert specs["model.embed_tokens.weight"] == P("model", None)
    # threefry is partitionable: the values do not depend on the mesh.
    plain = _params(_build("Llama", 2))
    for name, value in _params(sharded).items():
        np.testing.assert_array_equal(value, plain[name], err_msg=name)


# ------------------------------------------------------------------ nested per-layer jit
def _unrolled(model, kv_caches, ids, md):
    """The model without the nested jit: every layer traced inline (the reference)."""
    x = model.model.embed_tokens(ids)
    out = []
    for layer, kv in zip(model.model.layers, kv_caches):
        kv, x = layer(kv, x, md)
        out.append(kv)
    return out, model.model.norm(x)


def _batch(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    batcher = PagedBatcher(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS, seed=seed)
    vocab = model.config.vocab_size
    ids, md = batcher.step({s: rng.integers(0, vocab, n).tolist() for s, n in enumerate((5, 1, 7))},
                           PAD_TOKENS, PAD_SEQS)
    spec = model.kv_cache_spec
    kv = [jnp.asarray(rng.normal(size=(NUM_PAGES, PAGE_SIZE, 2 * spec.num_kv_heads, spec.head_dim)),
                      model.dtype) for _ in range(spec.num_layers)]
    return kv, ids, md


def _run(fn, model, kv, ids, md):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, kv, ids, md):
        return fn(nnx.merge(graphdef, state), kv, ids, md)
    return step(state, kv, ids, md)


@pytest.mark.parametrize("arch,extra,structures", [
    ("Llama", {}, 1),
    # Qwen2 windows from max_window_layers on: two layer structures (full, sliding).
    ("Qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2), 2),
    ("Qwen3", dict(head_dim=16), 1),
])
def test_layers_traced_once_per_structure_and_bit_identical(arch, extra, structures, monkeypatch):
    model = _build(arch, 4, **extra)
    windows = {layer.self_attn.sliding_window for layer in model.model.layers}
    assert len(windows) == structures
    kv, ids, md = _batch(model)

    calls = []
    real_call = llama.DecoderLayer.__call__
    monkeypatch.setattr(llama.DecoderLayer, "__call__",
                        lambda self, *a: (calls.append(1), real_call(self, *a))[1])
    new_kv, hidden = _run(lambda m, *a: m(*a), model, kv, ids, md)
    assert len(calls) == structures          # traced once per distinct layer, not 4 times
    ref_kv, ref_hidden = _run(_unrolled, model, kv, ids, md)
    assert len(calls) == structures + 4
    np.testing.assert_array_equal(np.asarray(hidden), np.asarray(ref_hidden))
    for a, b in zip(new_kv, ref_kv, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(new_kv[0]), np.asarray(kv[0]))  # the step did write


def test_step_hlo_holds_one_layer_body():
    model = _build("Llama", 4)
    kv, ids, md = _batch(model)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, kv, ids, md):
        return nnx.merge(graphdef, state)(kv, ids, md)

    text = step.lower(state, kv, ids, md).as_text()
    # The layer is one private function called once per layer.
    assert text.count("func.func private @_layer_apply") == 1
    assert text.count("call @_layer_apply") == 4
    # The cache stays donated: each of the 4 KV inputs is aliased to an output.
    assert text.count("tf.aliasing_output") == 4


# ------------------------------------------------------------------ stored programs (warm start)
_START = """
import json, sys, jax
lowered = []
real_lower = jax.stages.Traced.lower
jax.stages.Traced.lower = lambda self, *a, **k: (lowered.append(1), real_lower(self, *a, **k))[1]
from jaxllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32,
          num_decode_steps=2, compilation_cache_dir=sys.argv[2], progress=False)
out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
print(json.dumps({"lowered": len(lowered), "programs": llm.stats()["num_compilations"],
                  "tokens": out[0].outputs[0].token_ids}))
"""


def test_warm_start_loads_stored_programs_without_lowering(tiny_llama_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    def start() -> tuple[dict, str]:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # Stored programs are on by default only on GPUs; forced on here to test the mechanism
        # (this tiny model's CPU programs reload correctly; see ModelRunner._compile_jobs).
        env = dict(os.environ, JAXLLM_STORED_PROGRAMS="1")
        proc = subprocess.run([sys.executable, "-c", _START, tiny_llama_dir, str(tmp_path)],
                              capture_output=True, text=True, timeout=300, cwd=repo, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    cold, _ = start()
    programs = tmp_path / "jaxllm-programs"
    stored = sorted(os.listdir(programs))
    assert cold["lowered"] == cold["programs"] == len(stored) > 0
    broken = programs / stored[0]
    good = broken.read_bytes()
    broken.write_bytes(b"not a program")
    # Warm: every stored program loads without lowering, except the broken one, which is compiled
    # again (with a warning) and stored again.
    warm, log = start()
    assert warm["lowered"] == 1 and warm["programs"] == cold["programs"]
    assert "ignoring cached program" in log
    assert warm["tokens"] == cold["tokens"]
    assert sorted(os.listdir(programs)) == stored
    assert broken.read_bytes()[:2] == good[:2] and len(broken.read_bytes()) > 1000   # a pickle again
