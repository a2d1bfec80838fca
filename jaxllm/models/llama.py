"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral; Qwen2/Qwen3 subclass it in qwen.py).

The module tree mirrors Hugging Face names (``model.layers.N.self_attn.q_proj.kernel`` ↔
``model.layers.N.self_attn.q_proj.weight``), so the loader maps checkpoints mechanically.
The KV cache is passed in and returned: the model is a pure function of (params, kv_caches,
batch) once ``nnx.split``, and the runner jits it with the caches donated.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.attention import Attention
from jaxllm.layers.attention_metadata import AttentionMetadata
from jaxllm.layers.embed import Embed
from jaxllm.layers.linear import COLUMN_PARALLEL, Linear
from jaxllm.layers.mlp import GatedMLP
from jaxllm.layers.norm import RMSNorm
from jaxllm.layers.rope import RotaryEmbedding, rope_frequencies
from jaxllm.models.hf_config import ModelArgs, model_args


class KVCacheSpec(NamedTuple):
    """What the runner needs to allocate the cache: one ``[pages, page_size, 2*Hkv, D]`` per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class DecoderLayer(nnx.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, rope: RotaryEmbedding, *,
                 attention_backend: str, dtype: jnp.dtype):
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            qkv_bias=args.qkv_bias, o_bias=args.o_bias,
            qk_norm_eps=args.rms_norm_eps if args.qk_norm else None, rope=rope,
            sliding_window=args.sliding_windows[layer_idx], attention_backend=attention_backend,
            dtype=dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, use_bias=args.mlp_bias, dtype=dtype)

    def __call__(self, kv_cache: jax.Array, x: jax.Array, md: AttentionMetadata
                 ) -> tuple[jax.Array, jax.Array]:
        # x: [T, hidden]
        kv_cache, h = self.self_attn(kv_cache, self.input_layernorm(x), md)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return kv_cache, x


@functools.partial(jax.jit, static_argnums=0)
def _layer_apply(graphdef: nnx.GraphDef, state: nnx.State, kv_cache: jax.Array, x: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
    """One decoder layer as a pure function of its state (nested inside the runner's jitted step).

    JAX traces and lowers it once per distinct ``graphdef`` and input shapes, not once per layer:
    the step's HLO calls one function per layer structure (Qwen2's per-layer sliding windows give
    one each), and XLA inlines the calls when it compiles, so the program is the same. This cuts
    the tracing and lowering of a 32-layer model about 32-fold at every start, warm ones included.
    """
    return nnx.merge(graphdef, state)(kv_cache, x, md)


class DecoderModel(nnx.Module):
    """Embedding, decoder layers and final norm (HF ``model.*``)."""

    def __init__(self, args: ModelArgs, *, attention_backend: str, dtype: jnp.dtype):
        inv_freq, scaling = rope_frequencies(dict(args.rope_parameters), args.head_dim,
                                             args.max_position_embeddings)
        rope = RotaryEmbedding(inv_freq, scaling)
        self.embed_tokens = Embed(args.vocab_size, args.hidden_size, dtype=dtype)
        self.layers = nnx.List([
            DecoderLayer(args, i, rope, attention_backend=attention_backend, dtype=dtype)
            for i in range(args.num_hidden_layers)
        ])
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, dtype=dtype)

    def __call__(self, kv_caches: list[jax.Array], input_ids: jax.Array, md: AttentionMetadata
                 ) -> tuple[list[jax.Array], jax.Array]:
        x = self.embed_tokens(input_ids)                                   # [T, hidden]
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            kv_cache, x = _layer_apply(*nnx.split(layer), kv_cache, x, md)
            new_caches.append(kv_cache)
        return new_caches, self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: ``(kv_caches, input_ids[T], md) -> (kv_caches, hidden[T, hidden_size])``.

    Build it with :func:`jaxllm.models.loader.load_model` (abstract init, then weights).
    """

    @classmethod
    def model_args(cls, hf_config: Any) -> ModelArgs:
        return model_args(hf_config, use_sliding_window=False)

    def __init__(self, args: ModelArgs, *, dtype: jnp.dtype = jnp.float32,
                 attention_backend: str = "auto"):
        self.args = args
        self.dtype = jnp.dtype(dtype)
        self.model = DecoderModel(args, attention_backend=attention_backend, dtype=dtype)
        self.lm_head = None if args.tie_word_embeddings else Linear(
            args.hidden_size, args.vocab_size, use_bias=False, dtype=dtype, sharding=COLUMN_PARALLEL)

    @property
    def config(self) -> ModelArgs:
        """The architecture numbers (HF-named: hidden_size, intermediate_size, vocab_size, ...)."""
        return self.args

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """``(num_layers, num_kv_heads, head_dim)``; each layer's cache is
        ``[num_pages, page_size, 2 * num_kv_heads, head_dim]`` in the model's dtype."""
        a = self.args
        return KVCacheSpec(a.num_hidden_layers, a.num_key_value_heads, a.head_dim)

    def __call__(self, kv_caches: list[jax.Array], input_ids: jax.Array, md: AttentionMetadata
                 ) -> tuple[list[jax.Array], jax.Array]:
        if len(kv_caches) != self.args.num_hidden_layers:
            raise ValueError(f"kv_caches: need one array per layer ({self.args.num_hidden_layers}), "
                             f"got {len(kv_caches)}")
        return self.model(kv_caches, input_ids, md)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        # hidden: [N, hidden_size] -> f32[N, vocab_size]
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return jnp.einsum("nd,dv->nv", hidden, self.lm_head.kernel[...],
                          preferred_element_type=jnp.float32)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding window on every layer."""

    @classmethod
    def model_args(cls, hf_config: Any) -> ModelArgs:
        return model_args(hf_config, use_sliding_window=True)
