"""Rotary position embeddings (rotate-half layout, as Hugging Face Llama/Mistral/Qwen).

``rope_frequencies`` turns a config's rope parameters into ``inv_freq`` and the cos/sin
scale; it mirrors ``transformers.modeling_rope_utils`` for the rope types below, in numpy so
that the model never needs torch. ``RotaryEmbedding`` applies them at each token's position.

Supported ``rope_type``s: "default", "linear", "llama3", "yarn", and "dynamic". Dynamic NTK
only changes the frequencies for positions >= max_position_embeddings, which the engine never
reaches (max_model_len is capped at it), so there it equals "default".
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _llama3(inv_freq: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the middle band interpolated.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[np.ndarray, float]:
    factor = p.get("factor") or max_pos / p["original_max_position_embeddings"]
    orig = p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def rope_frequencies(params: dict[str, Any], head_dim: int, max_position_embeddings: int
                     ) -> tuple[np.ndarray, float]:
    """Return ``(inv_freq f32[head_dim // 2], attention_scaling)`` for standardized rope params.

    Args:
        params: dict with "rope_type" and "rope_theta" plus the type's own keys (HF names).
        head_dim: per-head dimension (fully rotary).
        max_position_embeddings: the config's limit (used by yarn without "factor").
    """
    rope_type = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type: {rope_type!r} is not supported; supported rope types are "
                         f"{SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor: only 1.0 is supported, got {params['partial_rotary_factor']}")
    inv_freq = _base_inv_freq(theta, head_dim)
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn(theta, head_dim, params, max_position_embeddings)
    return inv_freq, 1.0


class RotaryEmbedding(nnx.Module):
    """Apply RoPE to ``x[T, H, D]`` at ``positions[T]``.

    The frequencies are stored as a tuple of floats: static graph data, a constant under jit.
    """

    def __init__(self, inv_freq: np.ndarray, attention_scaling: float = 1.0):
        self.inv_freq = tuple(float(f) for f in np.asarray(inv_freq, np.float32))
        self.attention_scaling = float(attention_scaling)

    def cos_sin(self, positions: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        # positions: i32[T] -> cos, sin: [T, D] in dtype (computed in float32, as HF does)
        inv_freq = jnp.asarray(np.array(self.inv_freq, np.float32))
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, D/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)                        # [T, D]
        cos = (jnp.cos(emb) * self.attention_scaling).astype(dtype)
        sin = (jnp.sin(emb) * self.attention_scaling).astype(dtype)
        return cos, sin

    @staticmethod
    def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        # x: [T, H, D]; cos, sin: [T, D]
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]
