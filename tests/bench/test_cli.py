"""`jaxllm bench` parser: sub-subcommands, vLLM defaults, engine flags shared with `jaxllm generate`."""

from __future__ import annotations

import math

from jaxllm.entrypoints.cli import build_parser, engine_kwargs, main


def test_subcommands_set_func_and_vllm_defaults():
    p = build_parser()
    lat = p.parse_args(["bench", "latency", "--model", "llama-3.1-8b", "--load-format", "dummy"])
    tp = p.parse_args(["bench", "throughput"])
    sv = p.parse_args(["bench", "serve"])
    assert {callable(a.func) for a in (lat, tp, sv)} == {True}
    assert len({a.func for a in (lat, tp, sv)}) == 3
    assert (lat.batch_size, lat.input_len, lat.output_len) == (8, 32, 128)
    assert (tp.num_prompts, tp.input_len, tp.output_len) == (1000, 1024, 128)
    assert math.isinf(sv.request_rate) and sv.max_concurrency is None
    kw = engine_kwargs(lat)
    assert kw["load_format"] == "dummy" and kw["max_num_seqs"] is None  # resolved per platform by EngineConfig.finalize


def test_bad_sizes_are_usage_errors(capsys):
    # checked before any engine or device work
    assert main(["bench", "latency", "--batch-size", "0"]) == 2
    assert "batch_size: must be >= 1" in capsys.readouterr().err
    assert main(["bench", "throughput", "--num-prompts", "0"]) == 2
    assert "num_prompts: must be >= 1" in capsys.readouterr().err
    assert main(["bench", "serve", "--goodput", "ttft"]) == 2
    assert "goodput" in capsys.readouterr().err
