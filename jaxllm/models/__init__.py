"""Flax NNX model definitions and checkpoint loading."""

from jaxllm.models.loader import load_model
from jaxllm.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class", "load_model"]
