"""Real model shapes (config.json of public checkpoints) checked abstractly: nothing allocated."""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxllm.presets
from jaxllm.layers.attention_metadata import AttentionMetadata
from jaxllm.models.registry import get_model_class

# The published config.json shapes (../shared/model_configs), shipped in the package as presets.
CONFIG_DIR = os.path.dirname(jaxllm.presets.__file__)
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json")))
# Parameter counts published with the checkpoints (safetensors metadata on the model cards).
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}


def _hf_config(path: str):
    import transformers

    d = json.load(open(path))
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def _formula(cfg, qkv_bias: bool, qk_norm: bool) -> int:
    h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // nh
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    attn += (nh * hd + 2 * nkv * hd) if qkv_bias else 0
    attn += 2 * hd if qk_norm else 0
    layer = attn + 3 * h * i + 2 * h
    return v * h + cfg.num_hidden_layers * layer + h + (0 if cfg.tie_word_embeddings else v * h)


def _abstract_model(cfg, dtype=jnp.bfloat16):
    cls = get_model_class(cfg.architectures)
    return nnx.eval_shape(lambda: cls(cls.model_args(cfg), dtype=dtype))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_parameter_count(path):
    cfg = _hf_config(path)
    model = _abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    count = sum(math.prod(x.shape) for x in leaves)
    arch = cfg.architectures[0]
    assert count == _formula(cfg, qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM")
    name = os.path.basename(path)[:-5]
    if name in PUBLISHED:
        assert count == PUBLISHED[name]


def test_forward_shapes_abstractly():
    cfg = _hf_config(os.path.join(CONFIG_DIR, "qwen2.5-0.5b.json"))
    model = _abstract_model(cfg)
    layers, kv_heads, head_dim = model.kv_cache_spec
    assert (layers, kv_heads, head_dim) == (24, 2, 64)
    T, S, P, pages, page_size = 16, 4, 8, 64, 16
    kv = [jax.ShapeDtypeStruct((pages, page_size, 2 * kv_heads, head_dim), jnp.bfloat16)] * layers
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    md = AttentionMetadata(i32(T), i32(T), i32(S), i32(S, P), i32(S + 1), i32(1))
    graphdef, state = nnx.split(model)

    def forward(state, kv, ids, md):
        m = nnx.merge(graphdef, state)
        kv, hidden = m(kv, ids, md)
        return kv, hidden, m.compute_logits(hidden[:S])

    new_kv, hidden, logits = jax.eval_shape(forward, state, kv, i32(T), md)
    assert [x.shape for x in new_kv] == [x.shape for x in kv]
    assert all(x.dtype == jnp.bfloat16 for x in new_kv)
    assert hidden.shape == (T, cfg.hidden_size) and hidden.dtype == jnp.bfloat16
    assert logits.shape == (S, cfg.vocab_size) and logits.dtype == jnp.float32
