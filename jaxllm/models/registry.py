"""Architecture name (config.json "architectures") → model class."""

from __future__ import annotations

from typing import Any

from jaxllm.models.llama import LlamaForCausalLM, MistralForCausalLM
from jaxllm.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architectures: Any) -> type[LlamaForCausalLM]:
    """The class for the first supported name in ``architectures`` (a list or one string).

    Raises:
        ValueError: none is supported; the message lists the supported architectures.
    """
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for name in names:
        if name in _MODELS:
            return _MODELS[name]
    raise ValueError(f"architectures: {names} not supported; supported architectures are "
                     f"{list(SUPPORTED_ARCHITECTURES)}")
