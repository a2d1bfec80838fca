"""jaxllm: a vLLM-class inference engine on JAX."""
