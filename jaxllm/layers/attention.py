"""Self-attention over the paged KV cache (Llama / Mistral / Qwen2 / Qwen3).

q/k/v projections → (Qwen3: per-head RMSNorm of q and k) → RoPE at each token's position →
write k/v into their cache slots → ragged paged attention → o_proj.

The q/k/v projections are three ``Linear`` s as loaded (HF names); ``jaxllm.models.fuse`` may
replace them by one ``qkv`` weight ``[hidden, Hkv, G + 2, D]`` (G = H // Hkv: along axis 2 the G
query heads of kv head h, then its k, then its v), computed with one matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxllm.layers.attention_metadata import AttentionMetadata
from jaxllm.layers.linear import COLUMN_PARALLEL, ROW_PARALLEL, Linear
from jaxllm.layers.norm import RMSNorm
from jaxllm.layers.rope import RotaryEmbedding
from jaxllm.parallel.mesh import MODEL_AXIS, model_axis_size


def _write_and_attend(kv_cache, q, k, v, md: AttentionMetadata, *, sm_scale, sliding_window, backend):
    # Per shard: q [T, H/tp, D], k/v [T, Hkv/tp, D], kv_cache [pages, page_size, 2*Hkv/tp, D].
    kv_cache = pallas_kernels.update_kv_cache(kv_cache, k, v, md.slot_mapping)
    o = pallas_kernels.ragged_paged_attention(
        q, kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, backend=backend)
    return kv_cache, o


class Attention(nnx.Module):
    """Grouped-query attention reading and writing one layer's KV pages.

    Args:
        hidden_size: model width.
        num_heads / num_kv_heads / head_dim: query heads, key/value heads, per-head size.
        qkv_bias: q/k/v projections have a bias (Qwen2, Llama ``attention_bias``).
        o_bias: o_proj has a bias (Llama ``attention_bias``).
        qk_norm_eps: if set, RMSNorm each q and k head before RoPE (Qwen3).
        rope: the rotary embedding shared by all layers.
        sliding_window: attend only to the last ``sliding_window`` keys (None: full).
        attention_backend: passed to ``pallas_kernels.ragged_paged_attention``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool, o_bias: bool, qk_norm_eps: float | None, rope: RotaryEmbedding,
                 sliding_window: int | None, attention_backend: str, dtype: jnp.dtype):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.attention_backend = attention_backend
        self.q_proj = Linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias, dtype=dtype,
                             sharding=COLUMN_PARALLEL)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, dtype=dtype,
                             sharding=COLUMN_PARALLEL)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, dtype=dtype,
                             sharding=COLUMN_PARALLEL)
        # Fused q/k/v (set by jaxllm.models.fuse.fuse_projections, which then drops q/k/v_proj):
        self.qkv = nnx.data(None)        # Param [hidden, Hkv, G + 2, D], split over Hkv
        self.qkv_bias = nnx.data(None)   # Param [Hkv, G + 2, D] (with qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, use_bias=o_bias, dtype=dtype,
                             sharding=ROW_PARALLEL)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope

    def _project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # x: [T, hidden] -> q: [T, H, D], k: [T, Hkv, D], v: [T, Hkv, D]
        T = x.shape[0]
        if self.qkv is not None:
            G = self.num_heads // self.num_kv_heads
            qkv = jnp.einsum("ti,ihgd->thgd", x, self.qkv[...])               # [T, Hkv, G + 2, D]
            if self.qkv_bias is not None:
                qkv = qkv + self.qkv_bias[...]
            # Query head h * G + g is qkv[:, h, g]: the reshape keeps the heads' original order.
            q = qkv[:, :, :G].reshape(T, self.num_heads, self.head_dim)       # [T, H, D]
            return q, qkv[:, :, G], qkv[:, :, G + 1]                           # k, v: [T, Hkv, D]
        q = self.q_proj(x).reshape(T, self.num_heads, self.head_dim)          # [T, H, D]
        k = self.k_proj(x).reshape(T, self.num_kv_heads, self.head_dim)       # [T, Hkv, D]
        v = self.v_proj(x).reshape(T, self.num_kv_heads, self.head_dim)       # [T, Hkv, D]
        return q, k, v

    def __call__(self, kv_cache: jax.Array, x: jax.Array, md: AttentionMetadata
                 ) -> tuple[jax.Array, jax.Array]:
        # kv_cache: [num_pages, page_size, 2 * Hkv, D]; x: [T, hidden]
        T = x.shape[0]
        q, k, v = self._project_qkv(x)                                     # [T, H|Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope.cos_sin(md.input_positions, q.dtype)        # [T, D]
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        fn = functools.partial(_write_and_attend, sm_scale=self.head_dim ** -0.5,
                               sliding_window=self.sliding_window, backend=self.attention_backend)
        if model_axis_size() > 1:
            # Tensor parallel: each device writes and attends over its own kv heads' pages.
            heads, pages = P(None, MODEL_AXIS, None), P(None, None, MODEL_AXIS, None)
            fn = jax.shard_map(fn, in_specs=(pages, heads, heads, heads, P()), out_specs=(pages, heads),
                               check_vma=False)
        kv_cache, o = fn(kv_cache, q, k, v, md)                            # o: [T, H, D]
        return kv_cache, self.o_proj(o.reshape(T, self.num_heads * self.head_dim))
