"""Gated SiLU MLP (SwiGLU) of Llama / Mistral / Qwen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.linear import COLUMN_PARALLEL, ROW_PARALLEL, Linear


class GatedMLP(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, use_bias: bool, dtype: jnp.dtype):
        self.gate_proj = Linear(hidden_size, intermediate_size, use_bias=use_bias, dtype=dtype,
                                sharding=COLUMN_PARALLEL)
        self.up_proj = Linear(hidden_size, intermediate_size, use_bias=use_bias, dtype=dtype,
                              sharding=COLUMN_PARALLEL)
        self.down_proj = Linear(intermediate_size, hidden_size, use_bias=use_bias, dtype=dtype,
                                sharding=ROW_PARALLEL)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [T, hidden] -> [T, hidden]; h: [T, intermediate]
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)
