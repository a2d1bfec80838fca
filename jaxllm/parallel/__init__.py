"""Device meshes and shardings for tensor parallelism (no communication code of our own: XLA
inserts the collectives from the shardings)."""

from jaxllm.parallel.mesh import DATA_AXIS, MODEL_AXIS, kv_cache_sharding, make_mesh, model_axis_size

__all__ = ["DATA_AXIS", "MODEL_AXIS", "kv_cache_sharding", "make_mesh", "model_axis_size"]
