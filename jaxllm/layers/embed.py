"""Token embedding, split over the vocabulary for tensor parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.linear import param


class Embed(nnx.Module):
    """``embedding[vocab, hidden]``; ``attend`` gives tied-embedding logits."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: jnp.dtype):
        self.vocab_size = vocab_size
        self.embedding = param((vocab_size, hidden_size), dtype, ("model", None))

    def __call__(self, ids: jax.Array) -> jax.Array:
        # ids: i32[T] -> [T, hidden]
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        # x: [N, hidden] -> f32[N, vocab]
        return jnp.einsum("nd,vd->nv", x, self.embedding[...], preferred_element_type=jnp.float32)
