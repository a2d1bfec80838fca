from pallas_kernels.kv_cache_update.reference import update_kv_cache

__all__ = ["update_kv_cache"]
