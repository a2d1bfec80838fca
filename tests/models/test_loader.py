"""Checkpoint loading: sharded files, dtypes, dummy weights, meshes and every error path."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.hf_config import load_hf_config
from jaxllm.models.loader import hf_param_map, load_model
from jaxllm.models.registry import SUPPORTED_ARCHITECTURES, get_model_class


def _load(path: str, **kw):
    return load_model(ModelConfig(model=path, **kw), load_hf_config(path))


def _params(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.var.get_value()) for name, t in hf_param_map(model).items()}


@pytest.fixture(scope="module")
def llama_params(tiny_llama_dir):
    return _params(_load(tiny_llama_dir))


@pytest.fixture
def ckpt_copy(tiny_llama_dir, tmp_path):
    """A writable copy of the tiny Llama checkpoint (config + tokenizer, weights optional)."""
    def make(with_weights: bool = True) -> str:
        out = tmp_path / "ckpt"
        shutil.copytree(tiny_llama_dir, out, ignore=None if with_weights
                        else shutil.ignore_patterns("*.safetensors"))
        return str(out)
    return make


def _hf_state(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _save(path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_weights_match_checkpoint_transposed(tiny_llama_dir, llama_params):
    hf = _hf_state(tiny_llama_dir)
    assert set(llama_params) == set(hf)
    for name, value in llama_params.items():
        expected = hf[name].T if name.endswith("proj.weight") or name == "lm_head.weight" else hf[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_sharded_checkpoint_loads_identically(tiny_llama_dir, llama_params, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    out = str(tmp_path / "sharded")
    hf.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    sharded = _params(_load(out))
    assert sharded.keys() == llama_params.keys()
    for name in sharded:
        np.testing.assert_array_equal(sharded[name], llama_params[name], err_msg=name)


def test_bfloat16_checkpoint_auto_dtype(tiny_llama_dir, llama_params, tmp_path):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16)
    out = str(tmp_path / "bf16")
    hf.save_pretrained(out, safe_serialization=True)
    model = _load(out)  # dtype="auto" → the config's bfloat16
    params = _params(model)
    assert {v.dtype for v in params.values()} == {jnp.dtype(jnp.bfloat16)}
    for name, value in params.items():
        expected = llama_params[name].astype(jnp.bfloat16)
        np.testing.assert_array_equal(value, expected, err_msg=name)
    # An explicit dtype overrides the checkpoint's.
    assert {v.dtype for v in _params(_load(out, dtype="float32")).values()} == {np.dtype(np.float32)}


def test_dummy_weights_need_only_config(ckpt_copy, llama_params):
    path = ckpt_copy(with_weights=False)
    params = _params(_load(path, load_format="dummy", seed=1))
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in llama_params.items()}
    np.testing.assert_array_equal(params["model.norm.weight"], 1.0)
    w = params["model.layers.0.mlp.up_proj.weight"]
    assert np.all(np.isfinite(w)) and 0.01 < w.std() < 0.03
    other_seed = _params(_load(path, load_format="dummy", seed=2))
    assert not np.array_equal(other_seed["model.layers.0.mlp.up_proj.weight"], w)


def test_params_carry_sharding_and_are_placed_on_mesh(tiny_llama_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    model = load_model(ModelConfig(model=tiny_llama_dir), load_hf_config(tiny_llama_dir), mesh=mesh)
    specs = {name: t.var.get_value().sharding.spec for name, t in hf_param_map(model).items()}
    assert specs["model.layers.0.self_attn.q_proj.weight"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["model.layers.0.self_attn.o_proj.weight"] == jax.sharding.PartitionSpec("model", None)
    assert specs["model.embed_tokens.weight"] == jax.sharding.PartitionSpec("model", None)
    assert specs["lm_head.weight"] == jax.sharding.PartitionSpec(None, "model")
    state_specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert state_specs["model"]["layers"][1]["mlp"]["down_proj"]["kernel"].get_value() == \
        jax.sharding.PartitionSpec("model", None)


def test_unknown_architecture_names_supported_list(ckpt_copy):
    path = ckpt_copy()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["FooForCausalLM"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="FooForCausalLM") as err:
        _load(path)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        get_model_class(None)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_config(str(tmp_path / "nowhere"))


def test_missing_weights(ckpt_copy):
    path = ckpt_copy(with_weights=False)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _load(path)


def test_pickle_only_checkpoint_is_refused(ckpt_copy):
    path = ckpt_copy(with_weights=False)
    open(os.path.join(path, "pytorch_model.bin"), "wb").write(b"not read")
    with pytest.raises(ValueError, match="pickle") as err:
        _load(path)
    assert "safetensors" in str(err.value) and "pytorch_model.bin" in str(err.value)


def test_checkpoint_missing_a_tensor(ckpt_copy):
    path = ckpt_copy()
    tensors = _hf_state(path)
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    _save(path, tensors)
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.gate_proj\.weight"):
        _load(path)


def test_checkpoint_shape_mismatch_names_tensor(ckpt_copy):
    path = ckpt_copy()
    tensors = _hf_state(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    _save(path, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(8, 64\)"):
        _load(path)


def test_unexpected_tensor_rejected_but_inv_freq_ignored(ckpt_copy):
    path = ckpt_copy()
    tensors = _hf_state(path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    _save(path, tensors)
    _load(path)  # knowingly ignored
    tensors["model.layers.0.extra.weight"] = np.ones(3, np.float32)
    _save(path, tensors)
    with pytest.raises(ValueError, match=r"does not use.*model\.layers\.0\.extra\.weight"):
        _load(path)


def test_orbax_format_on_a_safetensors_dir_says_so(tiny_llama_dir):
    with pytest.raises(FileNotFoundError, match="orbax"):
        _load(tiny_llama_dir, load_format="orbax")


def test_mistral_consolidated_file_is_skipped(ckpt_copy):
    """Mistral repos carry consolidated.safetensors (native names) beside the HF weights."""
    path = ckpt_copy()
    from safetensors.numpy import save_file
    save_file({"layers.0.attention.wq.weight": np.ones((4, 4), np.float32)},
              os.path.join(path, "consolidated.safetensors"))
    _load(path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.embed_tokens\.weight.*"
                                         r"does not use.*layers\.0\.attention\.wq\.weight"):
        _load(path)  # only the native file left: used, and its names match nothing
