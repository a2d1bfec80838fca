"""Build a model from a local Hugging Face checkpoint directory.

The model is created abstractly (``nnx.eval_shape``: shapes only, no memory), then every
parameter is filled one tensor at a time from the safetensors files (or with random "dummy"
weights), placed directly with its tensor-parallel sharding when a mesh is given. So a model
never exists twice in memory.

HF names map onto the NNX tree one to one: ``model.layers.3.mlp.up_proj.weight`` [out, in]
is ``model.layers[3].mlp.up_proj.kernel`` [in, out] (transposed); ``embed_tokens.weight`` is
``embed_tokens.embedding``; norm ``weight`` and ``bias`` keep their names.
"""

from __future__ import annotations

import dataclasses

import functools
import glob
import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.models.hf_config import resolve_dtype
from jaxllm.models.orbax_io import load_orbax, read_marker
from jaxllm.models.registry import get_model_class

_INDEX_FILE = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


class _Target:
    """One model parameter and how its checkpoint tensor maps onto it."""

    def __init__(self, var: nnx.Param, transpose: bool):
        self.var = var
        self.transpose = transpose

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.var.get_value().shape)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def hf_param_map(model: nnx.Module) -> dict[str, _Target]:
    """HF tensor name → model parameter, for every parameter of ``model``."""
    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *prefix, leaf = (str(p) for p in path)
        if leaf == "kernel":
            targets[".".join([*prefix, "weight"])] = _Target(var, transpose=True)
        elif leaf == "embedding":
            targets[".".join([*prefix, "weight"])] = _Target(var, transpose=False)
        else:  # RMSNorm "weight", Linear "bias"
            targets[".".join([*prefix, leaf])] = _Target(var, transpose=False)
    return targets


def _is_ignored(name: str, tied: bool) -> bool:
    # Rotary tables are recomputed; a tied checkpoint may still carry an lm_head copy.
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files (from the index when sharded).

    Raises:
        ValueError: only pickle files (*.bin/*.pt/*.pth) are present.
        FileNotFoundError: no weights at all.
    """
    index = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(path, fn) for fn in weight_map.values()})
        missing = [fn for fn in files if not os.path.isfile(fn)]
        if missing:
            raise FileNotFoundError(f"model: {index} lists missing files {missing}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    # Mistral repos ship their native-format consolidated.safetensors beside the HF files.
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    if files:
        return hf_files or files
    pickles = [p for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat))]
    if pickles:
        raise ValueError(
            f"model: {path!r} holds only pickle weights ({sorted(os.path.basename(p) for p in pickles)}); "
            "loading pickle files can run arbitrary code, so jaxllm reads only *.safetensors. "
            "Convert the checkpoint, e.g. transformers' "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True).")
    raise FileNotFoundError(f"model: no *.safetensors weights in {path!r}")


def _place(x: jax.Array, var: nnx.Param, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return x
    spec = var.get_metadata().get("out_sharding") or ()
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _iter_tensors(files: list[str]) -> Iterator[tuple[str, Any, Callable[[], jax.Array]]]:
    """(name, lazy slice for the header's shape, read()) per tensor; nothing is read until read()."""
    from safetensors import safe_open

    # framework="flax" reads bfloat16 too (numpy cannot).
    for fn in files:
        with safe_open(fn, framework="flax") as f:
            for name in f.keys():
                yield name, f.get_slice(name), (lambda f=f, name=name: f.get_tensor(name))


_KV_PROJ = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
            "self_attn.v_proj.bias")


def _replicate_kv_heads(x: jax.Array, replicas: int, head_dim: int) -> jax.Array:
    """[Hkv * D, ...] → [Hkv * replicas * D, ...]: each kv head repeated ``replicas`` times in place.

    With tensor parallelism over more devices than kv heads, every device then holds the kv head
    of its own query heads (device d's query heads belong to checkpoint kv head d // replicas)."""
    heads = x.reshape(x.shape[0] // head_dim, head_dim, *x.shape[1:])
    return jnp.repeat(heads, replicas, axis=0).reshape(-1, *x.shape[1:])


def load_safetensors(model: nnx.Module, path: str, *, tied: bool, mesh: Mesh | None = None,
                     kv_replicas: int = 1) -> None:
    """Fill every parameter of ``model`` from the checkpoint in ``path``, checking names and shapes.

    ``kv_replicas > 1``: the model has that many copies of each checkpoint kv head (see
    ``load_model``); k/v projections are repeated head by head while loading."""
    files = safetensors_files(path)
    targets = hf_param_map(model)
    head_dim = model.config.head_dim
    loaded: set[str] = set()
    unexpected: list[str] = []
    with tqdm(desc="Loading safetensors", unit="tensor", total=len(targets)) as bar:
        for name, meta, read in _iter_tensors(files):
            target = targets.get(name)
            if target is None:
                if not _is_ignored(name, tied):
                    unexpected.append(name)
                continue
            shape = tuple(meta.get_shape())
            replicate = kv_replicas > 1 and name.endswith(_KV_PROJ)
            want = target.hf_shape if not replicate else (target.hf_shape[0] // kv_replicas,
                                                          *target.hf_shape[1:])
            if shape != want:
                raise ValueError(f"checkpoint tensor {name}: shape {shape} does not match the "
                                 f"model's {want}")
            dtype = target.var.get_value().dtype
            x = read().astype(dtype)
            if replicate:
                x = _replicate_kv_heads(x, kv_replicas, head_dim)
            if target.transpose:
                x = x.T
            target.var.set_value(_place(x, target.var, mesh))
            loaded.add(name)
            bar.update(1)
    missing = sorted(set(targets) - loaded)
    # Both lists in one message: side by side they show a naming mismatch at a glance.
    problems = [f"is missing tensors: {_first(missing)}"] if missing else []
    if unexpected:
        problems.append(f"has tensors the model does not use: {_first(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint {path!r} " + "; and ".join(problems))


def _first(names: list[str], n: int = 10) -> str:
    return f"{names[:n]}" + (f" (and {len(names) - n} more)" if len(names) > n else "")


# Dummy weights: uniform in (-a, a) with a = 0.02·√3, i.e. std 0.02 like HF's N(0, 0.02) init, so
# activations stay in a sane range; drawn in the parameter's own dtype (no f32 copy).
_DUMMY_STD = 0.02
_DUMMY_PRNG = "threefry2x32"  # with jax_threefry_partitionable, the values do not depend on the mesh


def _dummy_kind(name: str) -> str:
    return "zeros" if name.endswith(".bias") else "ones" if name.endswith("norm.weight") else "uniform"


def _layer_of(name: str) -> int:
    """``model.layers.N.*`` → N; every other tensor (embedding, final norm, lm_head) → -1."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else -1


@functools.lru_cache(maxsize=None)
def _dummy_group_fn(specs: tuple[tuple[tuple[int, ...], Any, str], ...], shardings: tuple | None):
    """One jitted program filling a group of tensors ((shape, dtype, kind) each) from one key.

    A group is one decoder layer (or the tensors outside the layers), so all layers of the same
    structure share one compile: 2 programs for a Llama of any depth instead of one per shape."""
    half = _DUMMY_STD * 3 ** 0.5

    def make(key):
        keys = jax.random.split(key, len(specs))
        out = []
        for k, (shape, dtype, kind) in zip(keys, specs):
            if kind == "uniform":
                out.append(jax.random.uniform(k, shape, dtype, -half, half))
            else:
                out.append(jnp.ones(shape, dtype) if kind == "ones" else jnp.zeros(shape, dtype))
        return tuple(out)

    return jax.jit(make) if shardings is None else jax.jit(make, out_shardings=shardings)


def load_dummy(model: nnx.Module, *, seed: int = 0, mesh: Mesh | None = None) -> None:
    """Random weights with the real shapes: uniform with std 0.02 for matrices, unit norms, zero
    biases, each placed with its ``out_sharding`` over ``mesh`` as it is generated."""
    key = jax.random.key(seed, impl=_DUMMY_PRNG)
    groups: dict[int, list[tuple[str, _Target]]] = {}
    for name, target in hf_param_map(model).items():
        groups.setdefault(_layer_of(name), []).append((name, target))
    for index, members in sorted(groups.items()):
        # Sorted by the name inside the layer, so every layer of one structure has the same specs.
        members.sort(key=lambda m: m[0].split(".", 3)[-1] if index >= 0 else m[0])
        specs, shardings = [], []
        for name, target in members:
            value = target.var.get_value()
            specs.append((tuple(value.shape), jnp.dtype(value.dtype), _dummy_kind(name)))
            spec = target.var.get_metadata().get("out_sharding") or ()
            shardings.append(NamedSharding(mesh, PartitionSpec(*spec)) if mesh is not None else None)
        fn = _dummy_group_fn(tuple(specs), tuple(shardings) if mesh is not None else None)
        for (_, target), x in zip(members, fn(jax.random.fold_in(key, index + 1))):
            target.var.set_value(x)


def shard_model_args(args, mesh: Mesh | None):
    """Check that the model splits over the mesh's "model" axis; replicate kv heads if tp > Hkv.

    Returns the (possibly widened) args and the kv-head replication factor."""
    tp = dict(mesh.shape).get("model", 1) if mesh is not None else 1
    if tp == 1:
        return args, 1
    for name in ("num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(args, name) % tp:
            raise ValueError(f"tensor_parallel_size: {tp} must divide {name} ({getattr(args, name)})")
    hkv = args.num_key_value_heads
    if hkv % tp == 0:
        return args, 1
    if tp % hkv:
        raise ValueError(f"tensor_parallel_size: {tp} must divide or be a multiple of num_key_value_heads "
                         f"({hkv})")
    return dataclasses.replace(args, num_key_value_heads=tp), tp // hkv


def load_model(model_config: ModelConfig, hf_config: Any, dtype: Any = None, *,
               attention_backend: str = "auto", mesh: Mesh | None = None) -> nnx.Module:
    """Build the model for ``hf_config`` and load its weights as ``model_config.load_format`` says.

    Args:
        model_config: path (``model``), ``load_format`` ("auto" | "dummy" | "orbax"), ``seed``.
        hf_config: the checkpoint's transformers config (see ``hf_config.load_hf_config``).
        dtype: parameter/activation dtype; None or "auto" → the checkpoint's (float32 if unset).
        attention_backend: passed to every attention layer.
        mesh: place each parameter with its ``out_sharding`` over this mesh (axis "model").

    Returns:
        The model (an ``nnx.Module``) with every parameter filled.
    """
    cls = get_model_class(getattr(hf_config, "architectures", None))
    args = cls.model_args(hf_config)
    dtype = resolve_dtype(model_config.dtype if dtype is None else dtype, hf_config)
    fmt = model_config.load_format
    if fmt == "orbax":
        read_marker(model_config.model)  # fail on a missing/old marker before building
    if fmt == "auto":
        safetensors_files(model_config.model)  # fail on missing/pickle weights before building
    args, kv_replicas = shard_model_args(args, mesh)
    model = nnx.eval_shape(lambda: cls(args, dtype=dtype, attention_backend=attention_backend))
    if fmt == "dummy":
        load_dummy(model, seed=model_config.seed, mesh=mesh)
    elif fmt == "orbax":
        load_orbax(model, model_config.model, mesh=mesh, kv_replicas=kv_replicas)
    else:
        load_safetensors(model, model_config.model, tied=args.tie_word_embeddings, mesh=mesh,
                         kv_replicas=kv_replicas)
    return model
