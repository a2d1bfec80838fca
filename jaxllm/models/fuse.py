"""Fused q/k/v and gate/up projections (vLLM's QKVParallelLinear / MergedColumnParallelLinear).

Models are built and loaded with HF's separate projections (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``), so checkpoint names, the loader, orbax files and ``jaxllm convert``
never see a fused tensor. The engine then calls :func:`fuse_projections`, which turns each
layer's projections into one weight read by one matmul (fewer, larger GEMMs: ~7-9% of batch-1
decode on an H100):

* attention ``qkv`` ``[hidden, Hkv, G + 2, D]`` with G = H // Hkv: along axis 2 the G query
  heads of kv head h (query head ``h * G + g``), then its k, then its v; split over Hkv
  (``P(None, "model", None, None)``), so every tensor-parallel shard holds whole kv-head groups.
  With bias (Qwen2, Llama ``attention_bias``): ``qkv_bias`` ``[Hkv, G + 2, D]``.
  When tp > Hkv the loader has already repeated each kv head (``loader.shard_model_args``); the
  fused layout is built from those widened heads, so it stays whole-group per shard.
* MLP ``gate_up`` ``[hidden, 2, intermediate]`` (gate, up), split over intermediate
  (``P(None, None, "model")``); with bias ``gate_up_bias`` ``[2, intermediate]``.

Each fused array is built by a jitted concatenation whose output sharding is the fused param's own
(the inputs' shards line up with it, so nothing moves between devices), one module at a time:
the old projections are dropped before the next module is fused, so at most one layer's q/k/v (or
gate/up) weights exist twice.

Environment:
    JAXLLM_FUSE_PROJECTIONS: "1" (default) fuse in the engine after loading; "0" keep the separate
    projections (e.g. to A/B the two in one benchmark run). Read by :func:`fusion_enabled`.
"""

from __future__ import annotations

import functools
import gc
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.layers.attention import Attention
from jaxllm.layers.mlp import GatedMLP

ENV_VAR = "JAXLLM_FUSE_PROJECTIONS"

# Partition specs of the fused params over the mesh's "model" axis.
QKV_SHARDING = (None, "model", None, None)     # [hidden, Hkv, G + 2, D]
QKV_BIAS_SHARDING = ("model", None, None)      # [Hkv, G + 2, D]
GATE_UP_SHARDING = (None, None, "model")       # [hidden, 2, intermediate]
GATE_UP_BIAS_SHARDING = (None, "model")        # [2, intermediate]


def fusion_enabled() -> bool:
    """``JAXLLM_FUSE_PROJECTIONS`` ("1" by default).

    Raises:
        ValueError: the variable is set to anything but "0" or "1".
    """
    value = os.environ.get(ENV_VAR, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}: must be '0' or '1', got {value!r}")
    return value == "1"


def _stack_qkv(q: jax.Array, k: jax.Array, v: jax.Array, num_kv_heads: int, head_dim: int) -> jax.Array:
    # q: [..., H * D], k/v: [..., Hkv * D] (kernels have a leading hidden axis, biases none)
    lead = q.shape[:-1]
    q = q.reshape(*lead, num_kv_heads, -1, head_dim)      # [..., Hkv, G, D]: head h*G+g at [h, g]
    k = k.reshape(*lead, num_kv_heads, 1, head_dim)       # [..., Hkv, 1, D]
    v = v.reshape(*lead, num_kv_heads, 1, head_dim)
    return jnp.concatenate([q, k, v], axis=-2)            # [..., Hkv, G + 2, D]


def _stack_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
    # gate/up: [..., I] -> [..., 2, I]
    return jnp.stack([gate, up], axis=-2)


@functools.lru_cache(maxsize=None)
def _jitted(kind: str, sharding: NamedSharding | None):
    """One jitted builder per (kind, output sharding); it retraces only for new shapes/dtypes."""
    if kind == "qkv":
        fn, static = _stack_qkv, ("num_kv_heads", "head_dim")
    else:
        fn, static = _stack_gate_up, ()
    if sharding is None:
        return jax.jit(fn, static_argnames=static)
    return jax.jit(fn, static_argnames=static, out_shardings=sharding)


def _fused_param(kind: str, spec: tuple, parts: list[nnx.Param], **static) -> nnx.Param:
    """Build the fused array from ``parts`` on their mesh (if any) with partition ``spec``."""
    values = [p.get_value() for p in parts]
    src = values[0].sharding
    sharding = NamedSharding(src.mesh, PartitionSpec(*spec)) if isinstance(src, NamedSharding) else None
    fused = _jitted(kind, sharding)(*values, **static)
    return nnx.Param(fused, out_sharding=spec, eager_sharding=False)


def _fuse_attention(attn: Attention) -> list[jax.Array]:
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    heads = dict(num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim)
    attn.qkv = _fused_param("qkv", QKV_SHARDING, [q.kernel, k.kernel, v.kernel], **heads)
    if q.bias is not None:
        attn.qkv_bias = _fused_param("qkv", QKV_BIAS_SHARDING, [q.bias, k.bias, v.bias], **heads)
    attn.q_proj = attn.k_proj = attn.v_proj = None
    return [p.get_value() for p in (attn.qkv, attn.qkv_bias) if p is not None]


def _fuse_mlp(mlp: GatedMLP) -> list[jax.Array]:
    gate, up = mlp.gate_proj, mlp.up_proj
    mlp.gate_up = _fused_param("gate_up", GATE_UP_SHARDING, [gate.kernel, up.kernel])
    if gate.bias is not None:
        mlp.gate_up_bias = _fused_param("gate_up", GATE_UP_BIAS_SHARDING, [gate.bias, up.bias])
    mlp.gate_proj = mlp.up_proj = None
    return [p.get_value() for p in (mlp.gate_up, mlp.gate_up_bias) if p is not None]


def fuse_projections(model: nnx.Module) -> nnx.Module:
    """Replace every attention's q/k/v and every MLP's gate/up projections by fused weights, in place.

    Already fused modules are left alone. Do not use on a model that is to be saved with HF or
    orbax names (``jaxllm convert``): the fused params have no checkpoint names.

    Returns:
        ``model`` (modified in place), whose forward gives the same outputs as before.
    """
    # nnx.to_flat_state (the loader's name map) leaves reference cycles that hold every Param until
    # Python's cycle collector runs: collect them now, so each projection dropped below is freed at
    # once by reference counting.
    gc.collect()
    modules = [m for _, m in nnx.iter_modules(model) if isinstance(m, (Attention, GatedMLP))]
    for m in modules:
        if isinstance(m, Attention) and m.qkv is None:
            new = _fuse_attention(m)
        elif isinstance(m, GatedMLP) and m.gate_up is None:
            new = _fuse_mlp(m)
        else:
            continue
        # The old arrays are referenced only by the pending concatenation now; waiting for it
        # frees them before the next module's fused weights are allocated (bounded peak memory).
        jax.block_until_ready(new)
    return model
