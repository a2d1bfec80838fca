"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): Llama decoders with small changes."""

from __future__ import annotations

from typing import Any

from jaxllm.models.hf_config import ModelArgs, model_args
from jaxllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """q/k/v projections always carry a bias; o_proj none; sliding window only if
    ``use_sliding_window`` (on the layers HF's ``layer_types`` marks)."""

    @classmethod
    def model_args(cls, hf_config: Any) -> ModelArgs:
        return model_args(hf_config, qkv_bias=True, use_sliding_window=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """RMSNorm over each q and k head before RoPE; biases only if ``attention_bias``."""

    @classmethod
    def model_args(cls, hf_config: Any) -> ModelArgs:
        return model_args(hf_config, qk_norm=True, use_sliding_window=True)
