"""Dense projection with an ``[in, out]`` kernel and tensor-parallel sharding metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Sharding of a kernel [in, out] over the mesh's "model" axis.
COLUMN_PARALLEL = (None, "model")  # split outputs: q/k/v/gate/up projections, lm_head
ROW_PARALLEL = ("model", None)     # split inputs: o/down projections (followed by an all-reduce)


def param(shape: tuple[int, ...], dtype: jnp.dtype, sharding: tuple[str | None, ...]) -> nnx.Param:
    """A zero-filled parameter carrying its partition spec (filled later by the loader).

    Models are built under ``nnx.eval_shape``, so this never allocates for real; the loader
    replaces each value with checkpoint (or dummy) weights, placed with ``sharding``.
    """
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=sharding, eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in_features, out_features]``.

    HF stores ``weight`` as ``[out, in]``; the loader transposes it into ``kernel``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: jnp.dtype,
                 sharding: tuple[str | None, str | None]):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = param((in_features, out_features), dtype, sharding)
        # The bias follows the kernel's output split (replicated for row-parallel layers).
        self.bias = param((out_features,), dtype, (sharding[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [T, in] -> y: [T, out]
        y = jnp.einsum("ti,io->to", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y
