"""Orbax checkpoints of a model's parameters: written by ``jaxllm convert``, read by
``load_format="orbax"``.

Layout of a converted directory::

    DIR/config.json, generation_config.json, tokenizer files   (copied from the HF checkpoint)
    DIR/jaxllm_orbax.json                                      (marker: format version, dtype, ...)
    DIR/params/                                                (orbax PyTreeCheckpointer, uncompressed)

``params`` holds ``nnx.to_pure_dict`` of the model's ``nnx.Param`` state: the NNX tree
(``model.layers.0.self_attn.q_proj.kernel``) in the model's own layout (kernels ``[in, out]``), in
the dtype chosen at conversion. Arrays are stored in chunks of at most ``CHUNK_BYTES`` so that a
device restoring a slice reads little more than its own slice.

The checkpoint keeps the ORIGINAL number of kv heads, so one checkpoint restores at any
tensor-parallel size. Restoring builds one ``jax.ShapeDtypeStruct(shape, dtype, sharding)`` per
parameter from its ``out_sharding`` metadata, so each device reads and holds only its own shard.
When tp > num_kv_heads the model holds ``kv_replicas`` copies of each kv head (see
``loader.shard_model_args``): k/v projections are then restored unreplicated on every device
(they are small: ``hidden x Hkv*D``) and repeated head by head on device.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_FILE = "jaxllm_orbax.json"
PARAMS_DIR = "params"
# Storage chunk size: big tensors are split into chunks of at most this many bytes.
CHUNK_BYTES = 8 << 20

Path = tuple[Any, ...]  # an NNX state path, e.g. ("model", "layers", 0, "mlp", "up_proj", "kernel")

_KV_PROJ = (("self_attn", "k_proj"), ("self_attn", "v_proj"))


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _params(model: nnx.Module) -> dict[Path, nnx.Param]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def read_marker(path: str) -> dict:
    """The marker of a converted checkpoint directory, checked.

    Raises:
        FileNotFoundError: ``path`` is not a converted checkpoint.
        ValueError: the marker's format version is not one this jaxllm reads.
    """
    marker = os.path.join(path, MARKER_FILE)
    if not os.path.isfile(marker):
        raise FileNotFoundError(f"model: {path!r} is not an orbax checkpoint (no {MARKER_FILE}); "
                                f"create one with `jaxllm convert --model HF_DIR --output {path}`")
    with open(marker) as f:
        meta = json.load(f)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"format_version: {marker} has {version!r}; this jaxllm reads only "
                         f"{FORMAT_VERSION}: convert the checkpoint again")
    return meta


def save_params(model: nnx.Module, directory: str) -> int:
    """Write every ``nnx.Param`` of ``model`` to ``directory`` (must not exist). Returns bytes written."""
    import orbax.checkpoint as ocp

    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    t0 = time.perf_counter()
    # Uncompressed: zstd saves ~10-20% of disk on bf16 weights but makes restores ~2x slower.
    with ocp.PyTreeCheckpointer(use_compression=False) as ckptr:
        ckptr.save(os.path.abspath(directory), state, save_args=save_args)
    logger.info("Saved %d parameter tensors (%.1f MiB) to %s in %.2fs", len(jax.tree.leaves(state)),
                nbytes / 2**20, directory, time.perf_counter() - t0)
    return nbytes


def _is_kv_proj(path: Path) -> bool:
    return any(tuple(str(p) for p in path[i:i + 2]) in _KV_PROJ for i in range(len(path) - 1))


def _sharding(var: nnx.Param, mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(mesh, PartitionSpec(*(var.get_metadata().get("out_sharding") or ())))


def _restore_targets(params: dict[Path, nnx.Param], mesh: Mesh | None,
                     kv_replicas: int) -> dict[Path, jax.ShapeDtypeStruct]:
    """One ``ShapeDtypeStruct`` per parameter: the stored shape, the model's dtype, its sharding.

    k/v projections of a model with replicated kv heads have ``1 / kv_replicas`` of the model's
    last-axis size on disk; they are restored fully replicated (``P()``) and widened afterwards."""
    targets = {}
    for path, var in params.items():
        value = var.get_value()
        shape, sharding = tuple(value.shape), _sharding(var, mesh)
        if kv_replicas > 1 and _is_kv_proj(path):
            # kernel [hidden, Hkv*r*D] / bias [Hkv*r*D] → stored [hidden, Hkv*D] / [Hkv*D]
            shape = (*shape[:-1], shape[-1] // kv_replicas)
            sharding = NamedSharding(mesh, PartitionSpec())
        targets[path] = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
    return targets


def _check_stored(directory: str, targets: dict[Path, jax.ShapeDtypeStruct]) -> None:
    """Compare the checkpoint's tree and shapes with the model's, naming what differs."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(directory).item_metadata
    stored = {_name(k): tuple(m.shape) for k, m in traverse_util.flatten_dict(dict(tree)).items()}
    wanted = {_name(k): tuple(t.shape) for k, t in targets.items()}
    missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"model: orbax checkpoint {directory!r} does not match the model: missing "
                         f"{missing[:10]}, unexpected {unexpected[:10]}")
    for name, shape in wanted.items():
        if stored[name] != shape:
            raise ValueError(f"model: orbax tensor {name} has shape {stored[name]}, the model expects "
                             f"{shape}")


def _widen_kv(x: jax.Array, replicas: int, head_dim: int, sharding) -> jax.Array:
    """[..., Hkv*D] → [..., Hkv*replicas*D], each kv head repeated in place (like the safetensors path)."""
    def widen(x):
        heads = x.reshape(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)
        return jnp.repeat(heads, replicas, axis=-2).reshape(*x.shape[:-1], -1)
    return jax.jit(widen, out_shardings=sharding)(x)


def load_orbax(model: nnx.Module, path: str, *, mesh: Mesh | None = None, kv_replicas: int = 1) -> None:
    """Fill every parameter of the abstract ``model`` from the converted checkpoint at ``path``.

    Args:
        model: built under ``nnx.eval_shape`` (shapes only); its parameters are replaced in place.
        path: a directory written by ``jaxllm convert``.
        mesh: restore each parameter with its ``out_sharding`` over this mesh (one device if None).
        kv_replicas: copies of each stored kv head in the model (tp > num_kv_heads).
    """
    import orbax.checkpoint as ocp

    meta = read_marker(path)
    head_dim = model.config.head_dim
    stored_hkv = model.config.num_key_value_heads // kv_replicas
    if meta.get("num_key_value_heads") != stored_hkv:
        raise ValueError(f"num_key_value_heads: the orbax checkpoint stores "
                         f"{meta.get('num_key_value_heads')}, the model config has {stored_hkv}")
    directory = os.path.abspath(os.path.join(path, PARAMS_DIR))
    params = _params(model)
    targets = _restore_targets(params, mesh, kv_replicas)
    _check_stored(directory, targets)
    t0 = time.perf_counter()
    target = traverse_util.unflatten_dict(targets)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    restored = traverse_util.flatten_dict(restored)
    for path_, var in params.items():
        x = restored[path_]
        if kv_replicas > 1 and _is_kv_proj(path_):
            x = _widen_kv(x, kv_replicas, head_dim, _sharding(var, mesh))
        var.set_value(x)
    nbytes = sum(t.size * t.dtype.itemsize for t in targets.values())
    logger.info("Restored %d parameter tensors (%.1f MiB) from orbax %s in %.2fs", len(targets),
                nbytes / 2**20, path, time.perf_counter() - t0)
