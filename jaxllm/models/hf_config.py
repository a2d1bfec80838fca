"""Read a Hugging Face ``PretrainedConfig`` into the few numbers the models need.

Handles both the transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x one
(``rope_parameters`` holding "rope_type", "rope_theta", ...), and ``torch_dtype`` / ``dtype``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

_DTYPE_NAMES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Architecture numbers shared by the Llama-family decoders (all fields HF-named)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    # Sorted (key, value) pairs, hashable so the module graph can be a static jit argument.
    rope_parameters: tuple[tuple[str, Any], ...]
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # One entry per layer: the sliding window of that layer, None for full attention.
    sliding_windows: tuple[int | None, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: must divide num_attention_heads "
                             f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"sliding_windows: need one entry per layer ({self.num_hidden_layers}), "
                             f"got {len(self.sliding_windows)}")


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """One flat dict with "rope_type" and "rope_theta" from either config layout."""
    params = getattr(cfg, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = getattr(cfg, "rope_scaling", None) or {}
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("rope_parameters: per-layer-type rope parameters are not supported")
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(cfg, "rope_theta", None) or 10000.0
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    return params


def sliding_windows(cfg: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: HF ``layer_types`` when given, else ``sliding_window`` everywhere.

    Qwen2/Qwen3 configs set ``sliding_window=None`` unless ``use_sliding_window`` and mark the
    layers from ``max_window_layers`` on as "sliding_attention"; Mistral applies its
    ``sliding_window`` to every layer.
    """
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * num_layers


def model_args(cfg: Any, *, qkv_bias: bool | None = None, qk_norm: bool = False,
               use_sliding_window: bool = True) -> ModelArgs:
    """Build :class:`ModelArgs` from an HF config.

    Args:
        cfg: the ``transformers`` config.
        qkv_bias: force q/k/v biases (Qwen2 always has them); None reads ``attention_bias``.
        qk_norm: per-head q/k RMSNorm (Qwen3).
        use_sliding_window: False for architectures that never use one (Llama).
    """
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act: only 'silu' is supported, got {act!r}")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    layers = cfg.num_hidden_layers
    return ModelArgs(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.rms_norm_eps),
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=tuple(sorted(rope_parameters(cfg).items())),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=qk_norm,
        sliding_windows=sliding_windows(cfg, layers) if use_sliding_window else (None,) * layers,
    )


def config_dtype(cfg: Any) -> jnp.dtype:
    """The checkpoint's dtype (``dtype`` in transformers 5, ``torch_dtype`` before); f32 if unset."""
    raw = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if raw is None:
        return jnp.dtype(jnp.float32)
    name = str(raw).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype: checkpoint dtype {name!r} is not one of {tuple(_DTYPE_NAMES)}")
    return jnp.dtype(_DTYPE_NAMES[name])


def resolve_dtype(dtype: str | jnp.dtype, cfg: Any) -> jnp.dtype:
    """``"auto"`` → the checkpoint's dtype; a name or dtype → that dtype."""
    if isinstance(dtype, str):
        if dtype == "auto":
            return config_dtype(cfg)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype: must be 'auto' or one of {tuple(_DTYPE_NAMES)}, got {dtype!r}")
        return jnp.dtype(_DTYPE_NAMES[dtype])
    return jnp.dtype(dtype)


def load_hf_config(path: str) -> Any:
    """``AutoConfig`` of a local checkpoint directory, with a clear error when it is missing."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model: no config.json in {path!r}")
    return transformers.AutoConfig.from_pretrained(path)
