"""Fused q/k/v and gate/up projections (jaxllm/models/fuse.py) against the separate ones.

Same checkpoint loaded twice, one copy fused: the fused weights hold exactly the old slices in the
designed layout, no separate projection is left, no memory is kept twice, and greedy decoding over
a ragged paged batch gives the same logits and tokens. The tensor-parallel case (tp=2, and tp=4 >
Hkv=2 with replicated kv heads) runs this file as a script in a fresh process with 8 simulated CPU
devices (XLA reads the device-count flag only at backend start).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

if __name__ == "__main__":  # the tensor-parallel subprocess: before jax starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.models.fuse import ENV_VAR, fuse_projections, fusion_enabled  # noqa: E402
from jaxllm.models.hf_config import load_hf_config  # noqa: E402
from jaxllm.models.loader import load_model  # noqa: E402
from tests.conftest import TINY_CHECKPOINTS, VOCAB_SIZE  # noqa: E402
from tests.models.paged_batch import PagedBatcher, jitted_step  # noqa: E402

PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ = 4, 24, 6
PAD_TOKENS, PAD_SEQS = 24, 4
PROMPT_LENS, DECODE_STEPS = (5, 12, 3), 4
ATOL = RTOL = 1e-5
SEPARATE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
KINDS = ("llama", "llama_tied", "qwen2", "qwen3")  # GQA; all biases + head_dim 32; qkv bias; q/k norm


def greedy(model, mesh=None) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prefill ``PROMPT_LENS`` random prompts in one ragged batch, then ``DECODE_STEPS`` greedy
    decode steps; returns the generated tokens per sequence and each step's f32 logits."""
    step = jitted_step(model)

    num_layers, num_kv_heads, head_dim = model.kv_cache_spec
    kv_sharding = None
    if mesh is not None:
        from jaxllm.parallel.mesh import kv_cache_sharding
        kv_sharding = kv_cache_sharding(mesh)
    kv = [jax.device_put(jnp.zeros((NUM_PAGES, PAGE_SIZE, 2 * num_kv_heads, head_dim), jnp.float32),
                         kv_sharding) for _ in range(num_layers)]
    rng = np.random.default_rng(0)
    schedule = {i: rng.integers(3, VOCAB_SIZE, n).tolist() for i, n in enumerate(PROMPT_LENS)}
    batcher = PagedBatcher(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS)
    tokens: list[list[int]] = [[] for _ in PROMPT_LENS]
    all_logits = []
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for _ in range(DECODE_STEPS + 1):
            ids, md = batcher.step(schedule, PAD_TOKENS, PAD_SEQS)
            kv, logits = step(kv, ids, md)
            ends = np.cumsum([len(t) for t in schedule.values()]) - 1
            last = np.asarray(logits)[ends]                  # [num_seqs, vocab]
            all_logits.append(last)
            schedule = {}
            for seq, tok in enumerate(last.argmax(-1).tolist()):
                tokens[seq].append(tok)
                schedule[seq] = [tok]
    return tokens, all_logits


def separate_weights(model) -> list[dict[str, np.ndarray]]:
    """Per layer: the separate projections' kernels/biases as host arrays (before fusion)."""
    out = []
    for layer in model.model.layers:
        w = {}
        for owner, names in ((layer.self_attn, SEPARATE[:3]), (layer.mlp, SEPARATE[3:])):
            for name in names:
                lin = getattr(owner, name)
                w[name] = np.array(lin.kernel.get_value(), copy=True)
                if lin.bias is not None:
                    w[name + ".bias"] = np.array(lin.bias.get_value(), copy=True)
        out.append(w)
    return out


def param_paths(model) -> list[str]:
    return [".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    path = request.getfixturevalue(TINY_CHECKPOINTS[request.param])
    load = lambda: load_model(ModelConfig(model=path), load_hf_config(path))  # noqa: E731
    plain, fused = load(), load()
    weights = separate_weights(fused)
    before = sum(x.nbytes for x in jax.live_arrays())
    assert fuse_projections(fused) is fused
    live_delta = sum(x.nbytes for x in jax.live_arrays()) - before
    return request.param, plain, fused, weights, live_delta


def test_fused_params_hold_the_separate_weights_in_the_designed_layout(pair):
    kind, plain, fused, weights, live_delta = pair
    a = fused.args
    G, D, Hkv, I = a.num_attention_heads // a.num_key_value_heads, a.head_dim, a.num_key_value_heads, \
        a.intermediate_size
    assert not [p for p in param_paths(fused) if any(s in p for s in SEPARATE)]
    assert [p for p in param_paths(plain) if "q_proj" in p]  # the unfused copy still has them
    assert live_delta == 0  # the separate arrays were freed: nothing is held twice
    for layer, w in zip(fused.model.layers, weights, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj is None and attn.k_proj is None and attn.v_proj is None
        assert mlp.gate_proj is None and mlp.up_proj is None
        qkv = np.asarray(attn.qkv.get_value())
        assert qkv.shape == (a.hidden_size, Hkv, G + 2, D)
        # Query head h*G + g is qkv[:, h, g]; kv head h's k and v follow its G query heads.
        np.testing.assert_array_equal(qkv[:, :, :G].reshape(a.hidden_size, -1), w["q_proj"])
        np.testing.assert_array_equal(qkv[:, :, G].reshape(a.hidden_size, -1), w["k_proj"])
        np.testing.assert_array_equal(qkv[:, :, G + 1].reshape(a.hidden_size, -1), w["v_proj"])
        assert (attn.qkv_bias is not None) == ("q_proj.bias" in w) == (kind in ("llama_tied", "qwen2"))
        if attn.qkv_bias is not None:
            b = np.asarray(attn.qkv_bias.get_value())
            assert b.shape == (Hkv, G + 2, D)
            np.testing.assert_array_equal(b[:, :G].reshape(-1), w["q_proj.bias"])
            np.testing.assert_array_equal(b[:, G].reshape(-1), w["k_proj.bias"])
            np.testing.assert_array_equal(b[:, G + 1].reshape(-1), w["v_proj.bias"])
        gate_up = np.asarray(mlp.gate_up.get_value())
        assert gate_up.shape == (a.hidden_size, 2, I)
        np.testing.assert_array_equal(gate_up[:, 0], w["gate_proj"])
        np.testing.assert_array_equal(gate_up[:, 1], w["up_proj"])
        assert (mlp.gate_up_bias is not None) == (kind == "llama_tied")
        if mlp.gate_up_bias is not None:
            np.testing.assert_array_equal(np.asarray(mlp.gate_up_bias.get_value()),
                                          np.stack([w["gate_proj.bias"], w["up_proj.bias"]]))
        assert attn.qkv.get_metadata()["out_sharding"] == (None, "model", None, None)
        assert mlp.gate_up.get_metadata()["out_sharding"] == (None, None, "model")


def test_fused_greedy_decode_matches_separate(pair):
    kind, plain, fused, _, _ = pair
    want_tokens, want_logits = greedy(plain)
    got_tokens, got_logits = greedy(fused)
    assert got_tokens == want_tokens, kind
    for step, (got, want) in enumerate(zip(got_logits, want_logits, strict=True)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"{kind}: step {step}")


def test_fusing_twice_changes_nothing(pair):
    _, _, fused, _, _ = pair
    qkv = fused.model.layers[0].self_attn.qkv.get_value()
    fuse_projections(fused)
    assert fused.model.layers[0].self_attn.qkv.get_value() is qkv


def test_env_var(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert fusion_enabled()
    monkeypatch.setenv(ENV_VAR, "0")
    assert not fusion_enabled()
    monkeypatch.setenv(ENV_VAR, "1")
    assert fusion_enabled()
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=ENV_VAR):
        fusion_enabled()


def test_tensor_parallel_fused_matches_separate_and_shards_whole_kv_groups():
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(": ok") == 2


def _check_tp_shards(fused, tp: int) -> None:
    """Every fused param is split over the tp devices on its designed axis (whole kv-head groups)."""
    for layer in fused.model.layers:
        for var, axis in ((layer.self_attn.qkv, 1), (layer.mlp.gate_up, 2)):
            x = var.get_value()
            want = list(x.shape)
            want[axis] //= tp
            assert len(x.addressable_shards) == tp, x.sharding
            assert {s.data.shape for s in x.addressable_shards} == {tuple(want)}, (x.shape, x.sharding)
            spec = [None] * x.ndim
            spec[axis] = "model"
            assert x.sharding.spec == jax.sharding.PartitionSpec(*spec)


def _tp_main() -> None:
    import tempfile

    from jaxllm.parallel.mesh import make_mesh
    from tests.conftest import make_tiny_checkpoint

    assert len(jax.devices()) == 8
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint("llama", os.path.join(tmp, "llama"))   # 4 q heads, 2 kv heads
        for tp in (2, 4):   # tp=4 > Hkv=2: the loader repeats each kv head twice
            mesh = make_mesh(tp)
            load = lambda: load_model(ModelConfig(model=path), load_hf_config(path), mesh=mesh)  # noqa: E731
            plain, fused = load(), fuse_projections(load())
            assert fused.kv_cache_spec.num_kv_heads == max(2, tp)
            _check_tp_shards(fused, tp)
            want_tokens, want_logits = greedy(plain, mesh)
            got_tokens, got_logits = greedy(fused, mesh)
            assert got_tokens == want_tokens, (tp, got_tokens, want_tokens)
            for got, want in zip(got_logits, want_logits, strict=True):
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"tp={tp}")
            print(f"tp={tp}: ok", flush=True)
    print("ALL OK")


if __name__ == "__main__":
    _tp_main()
