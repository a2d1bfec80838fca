"""Engine configuration: frozen dataclasses, each checked in ``__post_init__``.

``EngineConfig`` groups the four parts a user can set (model, cache, scheduler, parallel).
The CLI (``jaxllm.entrypoints.cli``) and ``LLM(...)`` both build it through
``EngineConfig.create(**kwargs)`` so there is one place where flags become config.
Values that depend on the checkpoint (``max_model_len=None`` → the model's own limit) are
resolved later by ``EngineConfig.finalize(hf_config)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_LOAD_FORMATS = ("auto", "dummy", "orbax")
_POLICIES = ("fcfs", "priority")


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        _check(isinstance(self.model, str) and bool(self.model), "model", "must be a non-empty path or name")
        _check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _check(self.load_format in _LOAD_FORMATS, "load_format",
               f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
               f"must be >= 1, got {self.max_model_len}")
        _check(isinstance(self.seed, int), "seed", "must be an int")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        _check(isinstance(self.block_size, int) and 1 <= self.block_size <= 256
               and self.block_size & (self.block_size - 1) == 0, "block_size",
               f"must be a power of two in [1, 256], got {self.block_size}")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
               f"must be >= 1, got {self.num_kv_blocks}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = None  # None: 256 on accelerators, 32 on CPU (see EngineConfig.finalize)
    max_num_batched_tokens: int | None = None
    policy: str = "fcfs"
    max_model_len: int = 0  # filled in by EngineConfig.finalize
    # When every running request is decoding, run this many decode steps per dispatch (the host
    # checks stops afterwards). 1 disables it.
    num_decode_steps: int = 8
    # vLLM's --async-scheduling: schedule and dispatch step t+1 before reading step t's sampled
    # tokens (they stay on device and feed t+1), so the device never waits for the host between
    # steps. Falls back to a synchronous step where a request needs its full history (penalties).
    # None (the default, as in vLLM): on, except with several processes; False: off.
    async_scheduling: bool | None = None

    def __post_init__(self):
        _check(self.max_num_seqs is None or self.max_num_seqs >= 1, "max_num_seqs",
               f"must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        _check(1 <= self.num_decode_steps <= 64, "num_decode_steps",
               f"must be in [1, 64], got {self.num_decode_steps}")
        _check(self.async_scheduling is None or isinstance(self.async_scheduling, bool), "async_scheduling",
               f"must be a bool or None, got {self.async_scheduling!r}")
        _check(self.policy in _POLICIES, "scheduling_policy",
               f"must be one of {_POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size",
               f"must be >= 1, got {self.tensor_parallel_size}")
        _check(self.data_parallel_size >= 1, "data_parallel_size",
               f"must be >= 1, got {self.data_parallel_size}")
        _check(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        _check(0 <= self.process_id < self.num_processes, "process_id",
               f"must be in [0, num_processes), got {self.process_id}")


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    # Compile every bucket at start-up (off only in tests that do not step).
    precompile: bool = True
    # JAX persistent compilation cache directory ("" disables it).
    compilation_cache_dir: str | None = None
    attention_backend: str = "auto"

    @staticmethod
    def create(model: str, **kw: Any) -> "EngineConfig":
        """Build from the flat vLLM-style keyword arguments of ``LLM(...)``."""
        groups: dict[type, dict[str, Any]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {},
                                              ParallelConfig: {}, EngineConfig: {}}
        alias = {"scheduling_policy": "policy"}
        for key, value in kw.items():
            key = alias.get(key, key)
            for cls in groups:
                if key in {f.name for f in dataclasses.fields(cls)}:
                    groups[cls][key] = value
                    break
            else:
                raise TypeError(f"unknown engine argument {key!r}")
        return EngineConfig(
            model_config=ModelConfig(model=model, **groups[ModelConfig]),
            cache_config=CacheConfig(**groups[CacheConfig]),
            scheduler_config=SchedulerConfig(**groups[SchedulerConfig]),
            parallel_config=ParallelConfig(**groups[ParallelConfig]),
            **groups[EngineConfig],
        )

    def finalize(self, model_max_len: int, platform: str = "gpu") -> "EngineConfig":
        """Resolve max_model_len, max_num_seqs and max_num_batched_tokens against the checkpoint's
        limit and the platform. Unset, they are sized for an accelerator (256 sequences, a
        2048–8192 token budget), or on CPU for a quick start (32 sequences, 512 tokens: every
        bucket is compiled at start-up, and a CPU compiles slowly)."""
        mc = self.model_config
        max_len = mc.max_model_len or model_max_len
        if mc.max_model_len is not None and mc.max_model_len > model_max_len:
            raise ValueError(f"max_model_len: {mc.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({model_max_len})")
        sc = self.scheduler_config
        cpu = platform == "cpu"
        mns = sc.max_num_seqs or (32 if cpu else 256)
        mnbt = sc.max_num_batched_tokens or (512 if cpu else max(2048, min(max_len, 8192)))
        return dataclasses.replace(
            self,
            model_config=dataclasses.replace(mc, max_model_len=max_len),
            scheduler_config=dataclasses.replace(sc, max_num_seqs=mns, max_num_batched_tokens=mnbt,
                                                 max_model_len=max_len),
        )
