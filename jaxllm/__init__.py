"""jaxllm: a vLLM-class LLM inference engine on JAX/XLA."""

from jaxllm.config import EngineConfig
from jaxllm.engine.outputs import CompletionOutput, RequestOutput
from jaxllm.entrypoints.llm import LLM
from jaxllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]
__version__ = "0.1.0"
