"""RMSNorm with Hugging Face numerics (LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.linear import param


class RMSNorm(nnx.Module):
    """Normalize over the last axis in float32, cast back, then multiply by ``weight``.

    HF computes ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(input_dtype)``; the cast
    before the multiply matters for bf16 parity.
    """

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight = param((dim,), dtype, (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., dim]
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...] * normed
