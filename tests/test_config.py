"""EngineConfig: flat vLLM kwargs → groups, validation naming the field, platform-aware defaults."""

import pytest

from jaxllm.config import EngineConfig


def test_unset_defaults_resolve_per_platform():
    cfg = EngineConfig.create("m")
    gpu = cfg.finalize(4096, platform="gpu").scheduler_config
    cpu = cfg.finalize(4096, platform="cpu").scheduler_config
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens, gpu.max_model_len) == (256, 4096, 4096)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (32, 512)
    explicit = EngineConfig.create("m", max_num_seqs=7, max_num_batched_tokens=99).finalize(4096, "cpu")
    assert (explicit.scheduler_config.max_num_seqs, explicit.scheduler_config.max_num_batched_tokens) == (7, 99)


@pytest.mark.parametrize("kw, field", [
    (dict(dtype="int8"), "dtype"), (dict(block_size=12), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(scheduling_policy="lifo"),
                                                                    "scheduling_policy"),
    (dict(load_format="pt"), "load_format"), (dict(num_decode_steps=0), "num_decode_steps"),
])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig.create("m", **kw)


def test_unknown_argument_and_too_long_max_model_len():
    with pytest.raises(TypeError, match="bogus"):
        EngineConfig.create("m", bogus=1)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig.create("m", max_model_len=9000).finalize(4096)


def test_async_scheduling_defaults_on_and_flags_override():
    from jaxllm.config import SchedulerConfig
    from jaxllm.entrypoints.cli import build_parser, engine_kwargs

    assert SchedulerConfig().async_scheduling is None          # the engine reads None as "on"
    for argv, want in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        args = build_parser().parse_args(["bench", "latency", "--model", "demo", *argv])
        assert engine_kwargs(args)["async_scheduling"] is want
    with pytest.raises(ValueError, match="async_scheduling"):
        SchedulerConfig(async_scheduling="yes")
