"""RoPE frequencies against transformers' own ROPE_INIT_FUNCTIONS, and config reading."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.layers.rope import RotaryEmbedding, rope_frequencies
from jaxllm.models.hf_config import model_args, rope_parameters

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
}


def _llama_config(rope: dict | None, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=512, rope_theta=50000.0, rope_scaling=rope, **kw)


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_frequencies_match_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _llama_config(ROPE_CASES[case])
    params = rope_parameters(cfg)
    inv_freq, scaling = rope_frequencies(params, 64, cfg.max_position_embeddings)
    rope_type = params["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (50000.0 ** (np.arange(0, 64, 2) / 64))
        expected_scaling = 1.0
    else:
        t, expected_scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        expected = t.numpy()
    assert inv_freq.shape == (32,) and inv_freq.dtype == np.float32
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    assert scaling == pytest.approx(expected_scaling, rel=1e-6)
    if rope_type != "default":  # the scaled table must actually differ from the plain one
        plain, _ = rope_frequencies({"rope_theta": 50000.0}, 64, 512)
        assert rope_type == "dynamic" or not np.allclose(inv_freq, plain)


def test_rotation_matches_transformers_apply():
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, LlamaRotaryEmbedding

    cfg = _llama_config(ROPE_CASES["llama3"])
    inv_freq, scaling = rope_frequencies(rope_parameters(cfg), 64, 512)
    rope = RotaryEmbedding(inv_freq, scaling)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4, 64)).astype(np.float32)       # [T, H, D]
    pos = np.array([0, 1, 2, 100, 300, 511, 5], np.int32)
    cos, sin = rope.cos_sin(pos, np.float32)
    ours = np.asarray(RotaryEmbedding.apply(x, cos, sin))
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor(pos)[None])
    xt = torch.tensor(x).transpose(0, 1)[None]              # [1, H, T, D]
    ref, _ = apply_rotary_pos_emb(xt, xt, hf_cos, hf_sin)
    # f32 sin/cos of arguments ~500 rad differ by ~1e-5 between XLA and torch range reduction.
    np.testing.assert_allclose(ours, ref[0].transpose(0, 1).numpy(), atol=5e-5)


def test_unsupported_rope_type_raises():
    with pytest.raises(ValueError, match="rope_type.*longrope.*supported"):
        rope_frequencies({"rope_type": "longrope", "rope_theta": 1e4}, 64, 512)


def test_legacy_rope_scaling_layout():
    """transformers 4.x configs: rope_theta at top level, rope_scaling with "type"."""
    class Legacy:
        rope_theta = 123.0
        rope_scaling = {"type": "linear", "factor": 2.0}
        max_position_embeddings = 64
    assert rope_parameters(Legacy()) == {"type": "linear", "factor": 2.0, "rope_type": "linear",
                                         "rope_theta": 123.0}


def test_sliding_window_per_layer():
    from transformers import MistralConfig, Qwen2Config

    q = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert model_args(q, qkv_bias=True).sliding_windows == (None, None, 16, 16)
    q_off = Qwen2Config(num_hidden_layers=4, use_sliding_window=False, sliding_window=16)
    assert model_args(q_off).sliding_windows == (None,) * 4
    m = MistralConfig(num_hidden_layers=3, sliding_window=32)
    assert model_args(m).sliding_windows == (32, 32, 32)
    assert model_args(m, use_sliding_window=False).sliding_windows == (None,) * 3
