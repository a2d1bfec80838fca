"""Start-up: checkpoint directory → (config, tokenizer, EOS ids, model with weights, ModelRunner)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jaxllm.config import EngineConfig

logger = logging.getLogger(__name__)

@dataclass
class Loaded:
    config: EngineConfig
    hf_config: Any
    tokenizer: Any
    eos_token_ids: set[int]
    runner: Any
    model_info: dict


def resolve_model_path(model: str) -> str:
    """Shipped names ("demo", "demo-draft", presets) → directories; anything else is a local path."""
    try:
        from jaxllm.demo_models import resolve_model_path as resolve_demo
        model = resolve_demo(model)
    except ImportError:
        pass
    try:
        from jaxllm.presets import resolve_preset
        model = resolve_preset(model)
    except ImportError:
        pass
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model: {model!r} is not a directory (no model hub is used: pass a local "
                                f"Hugging Face checkpoint directory)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model: no config.json in {model!r}")
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    has_tok = any(os.path.isfile(os.path.join(path, f))
                  for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))
    if not has_tok:
        logger.warning("No tokenizer files in %s: prompts must be token ids and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def eos_ids(path: str, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)

    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    if not ids:
        add(getattr(hf_config, "eos_token_id", None))
    if not ids and tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


def load_everything(config: EngineConfig, *, progress: bool = True, mesh=None) -> Loaded:
    from transformers import AutoConfig

    from jaxllm.models.hf_config import resolve_dtype
    from jaxllm.models.loader import load_model
    from jaxllm.parallel.mesh import kv_cache_sharding, make_mesh
    from jaxllm.runner.model_runner import ModelRunner

    mc = config.model_config
    path = resolve_model_path(mc.model)
    hf_config = AutoConfig.from_pretrained(path)
    import jax
    config = config.finalize(getattr(hf_config, "max_position_embeddings", 2048), platform=jax.default_backend())
    mc = config.model_config
    tokenizer = load_tokenizer(mc.tokenizer or path)
    dtype = resolve_dtype(mc.dtype, hf_config)
    pc = config.parallel_config
    kv_sharding = None
    if mesh is None and pc.tensor_parallel_size * pc.data_parallel_size > 1:
        mesh = make_mesh(pc.tensor_parallel_size, pc.data_parallel_size)
    if mesh is not None:
        kv_sharding = kv_cache_sharding(mesh)
        logger.info("Mesh %s over %d %s devices", dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform)
    from jaxllm.models.fuse import fuse_projections, fusion_enabled
    fuse = fusion_enabled()  # JAXLLM_FUSE_PROJECTIONS, checked before the weights are read
    model = load_model(mc.__class__(**{**mc.__dict__, "model": path}), hf_config, dtype,
                       attention_backend=config.attention_backend, mesh=mesh)
    if fuse:  # one q/k/v and one gate/up matmul per layer (checkpoint names stay the loader's)
        model = fuse_projections(model)
    runner = ModelRunner(config, model, mesh=mesh, kv_sharding=kv_sharding)
    info = {
        "model": mc.model,
        "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0],
        "max_model_len": mc.max_model_len,
        "vocab_size": int(hf_config.vocab_size),
        "dtype": jnp.dtype(dtype).name,
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "data_parallel_size": config.parallel_config.data_parallel_size,
        "block_size": config.cache_config.block_size,
        "num_kv_blocks": runner.num_blocks,
    }
    return Loaded(config, hf_config, tokenizer, eos_ids(path, hf_config, tokenizer), runner, info)
