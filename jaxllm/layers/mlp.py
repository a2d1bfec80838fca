"""Gated SiLU MLP (SwiGLU) of Llama / Mistral / Qwen.

gate/up are two ``Linear`` s as loaded (HF names); ``jaxllm.models.fuse`` may replace them by one
``gate_up`` weight ``[hidden, 2, intermediate]`` (gate at index 0, up at 1), one matmul.
"""

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
        # Fused gate/up (set by jaxllm.models.fuse.fuse_projections, which then drops gate/up_proj):
        self.gate_up = nnx.data(None)        # Param [hidden, 2, intermediate], split over intermediate
        self.gate_up_bias = nnx.data(None)   # Param [2, intermediate] (with use_bias)
        self.down_proj = Linear(intermediate_size, hidden_size, use_bias=use_bias, dtype=dtype,
                                sharding=ROW_PARALLEL)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [T, hidden] -> [T, hidden]; gate, up: [T, intermediate]
        if self.gate_up is not None:
            h = jnp.einsum("ti,ijn->tjn", x, self.gate_up[...])   # [T, 2, intermediate]
            if self.gate_up_bias is not None:
                h = h + self.gate_up_bias[...]
            gate, up = h[:, 0], h[:, 1]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)
