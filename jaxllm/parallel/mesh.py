"""The engine's mesh: axes ("data", "model").

Parameters carry their own partition specs (``out_sharding`` metadata, see layers/linear.py):
column-parallel q/k/v/gate/up and lm_head split their outputs over "model", row-parallel o/down
split their inputs (XLA adds the all-reduce after them), the embedding is split over the
vocabulary. The KV pages split on the combined kv-head axis, so each device holds whole (K, V)
head pairs of its own query heads; attention runs per shard under ``shard_map``.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(tensor_parallel_size: int, data_parallel_size: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ValueError(f"tensor_parallel_size: {tensor_parallel_size} x data_parallel_size "
                         f"{data_parallel_size} needs {need} devices, but {len(devices)} are visible "
                         f"({devices[0].platform})")
    # Auto axes: shardings of the parameters and the KV cache are given, XLA propagates the rest
    # and inserts the collectives (JAX's explicit-sharding mode would ask us to annotate every op).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data_parallel_size, tensor_parallel_size), (DATA_AXIS, MODEL_AXIS),
                         devices=devices[:need], axis_types=auto)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [num_pages, page_size, 2 * num_kv_heads, head_dim]: split the combined head axis."""
    return NamedSharding(mesh, P(None, None, MODEL_AXIS, None))


def model_axis_size() -> int:
    """Size of the "model" axis of the mesh in context (1 outside any mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(MODEL_AXIS, 1)
