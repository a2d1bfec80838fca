"""HF config → ModelArgs: dtype resolution and the errors a user gets for a bad config."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxllm.models.hf_config import config_dtype, model_args, resolve_dtype


def _cfg(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**base, **kw})


def test_head_dim_from_config_or_derived():
    assert model_args(_cfg()).head_dim == 8
    assert model_args(_cfg(head_dim=16)).head_dim == 16


@pytest.mark.parametrize("field, kw", [
    ("num_key_value_heads", dict(num_key_value_heads=3)),
    ("hidden_act", dict(hidden_act="gelu")),
    ("rope_type", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0],
                                     "long_factor": [1.0]})),
])
def test_bad_config_names_the_field(field, kw):
    from jaxllm.models.llama import LlamaForCausalLM
    from flax import nnx

    with pytest.raises(ValueError, match=field):
        args = model_args(_cfg(**kw))
        nnx.eval_shape(lambda: LlamaForCausalLM(args))


def test_dtype_resolution():
    assert config_dtype(_cfg()) == jnp.float32
    assert config_dtype(_cfg(dtype="bfloat16")) == jnp.bfloat16
    assert resolve_dtype("auto", _cfg(dtype="float16")) == jnp.float16
    assert resolve_dtype("float32", _cfg(dtype="bfloat16")) == jnp.float32
    assert resolve_dtype(jnp.bfloat16, _cfg()) == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", _cfg())


def test_odd_head_dim_rejected():
    cfg = _cfg()
    cfg.head_dim = 7  # transformers validates this at construction; set it behind its back
    with pytest.raises(ValueError, match="head_dim: must be even"):
        model_args(cfg)


def test_wrong_number_of_kv_caches():
    from flax import nnx

    from jaxllm.models.llama import LlamaForCausalLM

    model = nnx.eval_shape(lambda: LlamaForCausalLM(model_args(_cfg())))
    with pytest.raises(ValueError, match="kv_caches"):
        model([], jnp.zeros(4, jnp.int32), None)
