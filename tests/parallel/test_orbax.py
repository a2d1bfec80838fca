"""Orbax checkpoints: `jaxllm convert`, then `load_format="orbax"` at tp=1 and tp=4.

The tiny Llama (4 query heads, 2 kv heads) is converted once per module. At tp=1 every restored
parameter equals the safetensors-loaded one and greedy generation matches Hugging Face. The tp=4
part (kv heads replicated 2x on restore) runs in a fresh process with 8 simulated CPU devices
(``python -m tests.parallel.test_orbax OUT_JSON HF_DIR ORBAX_DIR``), because jax may already be
initialised with one device in this pytest worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_TOKENS = 12
TP = 4
ENGINE_KW = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, progress=False)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1] + rng.integers(3, 320, size=n).tolist() for n in (1, 6, 19, 40)]


def _generate(path: str, **kw):
    from jaxllm import LLM, SamplingParams
    from tests.utils import jaxllm_seqs

    llm = LLM(path, **ENGINE_KW, **kw)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    return jaxllm_seqs(llm.generate(_prompts(), sp, use_tqdm=False))


def _load(path: str, mesh=None, **kw):
    from jaxllm.config import ModelConfig
    from jaxllm.models.hf_config import load_hf_config
    from jaxllm.models.loader import hf_param_map, load_model

    model = load_model(ModelConfig(model=path, **kw), load_hf_config(path), mesh=mesh)
    return {name: t.var.get_value() for name, t in hf_param_map(model).items()}


@pytest.fixture(scope="module")
def orbax_dir(tiny_llama_dir, tmp_path_factory) -> str:
    from jaxllm.entrypoints.cli import main

    out = str(tmp_path_factory.mktemp("orbax") / "tiny_llama_orbax")
    assert main(["convert", "--model", tiny_llama_dir, "--output", out]) == 0
    return out


@pytest.fixture(scope="module")
def tied_orbax_dir(tiny_llama_tied_dir, tmp_path_factory) -> str:
    """Tied embeddings, q/k/v/o and MLP biases, head_dim 32: the bias paths of the restore."""
    from jaxllm.entrypoints.convert import convert

    out = str(tmp_path_factory.mktemp("orbax") / "tiny_llama_tied_orbax")
    convert(tiny_llama_tied_dir, out)
    return out


def test_cli_convert_writes_checkpoint(orbax_dir, tiny_llama_dir):
    from jaxllm.models.orbax_io import FORMAT_VERSION, MARKER_FILE, PARAMS_DIR

    files = set(os.listdir(orbax_dir))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 MARKER_FILE, PARAMS_DIR):
        assert name in files, (name, files)
    assert not any(f.endswith(".safetensors") for f in files)
    with open(os.path.join(orbax_dir, MARKER_FILE)) as f:
        marker = json.load(f)
    with open(os.path.join(tiny_llama_dir, "config.json")) as f:
        hf = json.load(f)
    assert marker["format_version"] == FORMAT_VERSION
    assert marker["dtype"] == "float32" and marker["architecture"] == hf["architectures"][0]
    assert marker["num_key_value_heads"] == hf["num_key_value_heads"]  # original heads, not replicated
    n_params = sum(int(np.prod(v.shape)) for v in _load(tiny_llama_dir).values())
    assert marker["num_parameters"] == n_params


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_params_equal_safetensors_at_tp1(kind, request):
    hf_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    ref = _load(hf_dir)
    got = _load(request.getfixturevalue("orbax_dir" if kind == "llama" else "tied_orbax_dir"),
                load_format="orbax")
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)


def test_convert_to_bfloat16(tiny_llama_dir, orbax_dir, tmp_path):
    import jax.numpy as jnp

    from jaxllm.entrypoints.convert import convert

    out = str(tmp_path / "bf16")
    assert convert(tiny_llama_dir, out, dtype="bfloat16")["dtype"] == "bfloat16"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"  # dtype="auto" then means the stored dtype
    ref, got = _load(tiny_llama_dir), _load(out, load_format="orbax")
    cast = _load(orbax_dir, load_format="orbax", dtype="bfloat16")  # float32 on disk, cast on restore
    for name in ref:
        assert got[name].dtype == cast[name].dtype == jnp.bfloat16, name
        want = np.asarray(ref[name].astype(jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(cast[name]), want, err_msg=name)


def test_errors(orbax_dir, tiny_llama_dir, tmp_path):
    import shutil

    from jaxllm.entrypoints.convert import convert
    from jaxllm.models.orbax_io import MARKER_FILE

    with pytest.raises(FileNotFoundError, match="not an orbax checkpoint"):
        _load(tiny_llama_dir, load_format="orbax")
    with pytest.raises(ValueError, match="output: .* not empty"):
        convert(tiny_llama_dir, orbax_dir)
    with pytest.raises(ValueError, match="output: must differ"):
        convert(tiny_llama_dir, tiny_llama_dir, overwrite=True)

    bad = str(tmp_path / "bad")
    shutil.copytree(orbax_dir, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**cfg, "intermediate_size": 2 * cfg["intermediate_size"]}, f)
    with pytest.raises(ValueError, match=r"mlp\.(up|down|gate)_proj\.kernel has shape"):
        _load(bad, load_format="orbax")
    with open(os.path.join(bad, MARKER_FILE), "w") as f:
        json.dump({"format_version": 999}, f)
    with pytest.raises(ValueError, match="format_version"):
        _load(bad, load_format="orbax")


@pytest.fixture(scope="module")
def hf_reference(tiny_llama_dir):
    from tests.utils import hf_greedy
    return hf_greedy(tiny_llama_dir, _prompts(), MAX_TOKENS)


def test_generate_tp1_matches_hf(orbax_dir, hf_reference):
    from tests.utils import check_logprobs_close

    seqs = _generate(orbax_dir, load_format="orbax", tensor_parallel_size=1)
    check_logprobs_close(seqs, hf_reference, "orbax tp=1", "hf")


def test_tp4_shardings_params_and_generation(orbax_dir, tiny_llama_dir, tied_orbax_dir, tiny_llama_tied_dir,
                                            hf_reference, tmp_path):
    from tests.utils import check_logprobs_close

    out_json = str(tmp_path / "tp4.json")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.parallel.test_orbax", out_json, tiny_llama_dir,
                           orbax_dir, tiny_llama_tied_dir, tied_orbax_dir], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out_json) as f:
        result = json.load(f)
    assert result["num_devices"] >= TP
    seqs = [(ids, [{int(k): v for k, v in lp} for lp in lps]) for ids, lps in result["seqs"]]
    check_logprobs_close(seqs, hf_reference, f"orbax tp={TP}", "hf")


def _check_equal_at_tp(hf_dir: str, orbax_dir: str, mesh) -> dict:
    """Restored params equal the safetensors-loaded ones on ``mesh`` (kv heads replicated alike)."""
    ref, got = _load(hf_dir, mesh=mesh), _load(orbax_dir, mesh=mesh, load_format="orbax")
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert got[name].sharding.is_equivalent_to(ref[name].sharding, got[name].ndim), name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)
    return got


def _tp_child(out_json: str, hf_dir: str, orbax_dir: str, tied_hf_dir: str, tied_orbax_dir: str) -> None:
    """In a process with 8 CPU devices: restored tp=4 params have the designed shardings and equal
    the safetensors-loaded tp=4 ones (k/v heads replicated the same way); then generate."""
    import jax
    from jax.sharding import PartitionSpec as P

    from jaxllm.parallel.mesh import make_mesh

    assert len(jax.devices()) >= TP, jax.devices()
    mesh = make_mesh(TP)
    tied = _check_equal_at_tp(tied_hf_dir, tied_orbax_dir, mesh)
    assert tied["model.layers.0.self_attn.k_proj.bias"].shape == (TP * 32,)  # 2 kv heads x 2, D=32
    got = _check_equal_at_tp(hf_dir, orbax_dir, mesh)
    # q: kernel [hidden, Hq*D] split on outputs; k: [hidden, 2 kv heads x 2 replicas x D];
    # embedding [vocab, hidden] split on the vocabulary; o: [Hq*D, hidden] split on inputs.
    split = {"model.layers.0.self_attn.q_proj.weight": (P(None, "model"), 1),
             "model.layers.1.self_attn.k_proj.weight": (P(None, "model"), 1),
             "model.embed_tokens.weight": (P("model", None), 0),
             "model.layers.0.self_attn.o_proj.weight": (P("model", None), 0)}
    for name, (spec, axis) in split.items():
        x = got[name]
        assert x.sharding.spec == spec, (name, x.sharding.spec)
        want = list(x.shape)
        want[axis] //= TP
        assert [s.data.shape for s in x.addressable_shards] == [tuple(want)] * TP, name
    assert got["model.layers.1.self_attn.k_proj.weight"].shape[1] == TP * 16  # head_dim 16, 4 heads
    seqs = _generate(orbax_dir, load_format="orbax", tensor_parallel_size=TP)
    with open(out_json, "w") as f:
        json.dump({"num_devices": len(jax.devices()),
                   "seqs": [(ids, [sorted(lp.items()) for lp in lps]) for ids, lps in seqs]}, f)


if __name__ == "__main__":
    _tp_child(*sys.argv[1:6])
