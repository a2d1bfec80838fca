"""Host-side policy: block pool, KV cache manager, scheduler. Never imports jax."""
