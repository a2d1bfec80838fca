"""`jaxllm bench latency` / `throughput` on a tiny random Llama (CPU): sane JSON, exact token counts."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from jaxllm.bench import roofline

ENGINE_KW = dict(max_num_seqs=4, max_model_len=128, num_kv_blocks=48, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_results")


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    from jaxllm import LLM
    return LLM(tiny_llama_dir, progress=False, **ENGINE_KW)


def _args(**kw) -> argparse.Namespace:
    base = dict(hw_copy_bytes=1 << 20, hw_matmul_n=64, disable_tqdm=True, profile=None, output_json=None,
                seed=0)
    return argparse.Namespace(**{**base, **kw})


def _positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert d[k] is not None and d[k] > 0 and math.isfinite(d[k]), (k, d[k])


def test_model_cost_matches_checkpoint(llm, tiny_llama_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_llama_dir, "model.safetensors"), "np") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    cost = roofline.ModelCost.from_engine(llm.llm_engine)
    cfg = llm.llm_engine.hf_config
    assert cost.param_count == n_params
    assert cost.param_bytes == 4 * n_params                      # float32 checkpoint
    assert cost.lm_head_params == cfg.vocab_size * cfg.hidden_size
    assert cost.embed_bytes == 4 * cfg.vocab_size * cfg.hidden_size   # untied
    assert cost.matmul_params == n_params - 2 * cfg.vocab_size * cfg.hidden_size
    assert cost.kv_bytes_per_token == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4


def test_latency_json(llm, results_dir):
    from jaxllm.bench.latency import run_latency

    out = results_dir / "lat.json"
    res = run_latency(_args(batch_size=2, input_len=12, output_len=6, num_iters=2, num_iters_warmup=1,
                            output_json=str(out)), llm=llm)
    data = json.loads(out.read_text())
    assert data["bench"] == "latency" and data["platform"] == "cpu"
    assert data["versions"]["jax"] and data["args"]["batch_size"] == 2
    _positive(data, "latency_mean_s", "tpot_median_ms", "ttft_median_ms", "itl_median_ms", "output_tokens_per_s",
              "mbu", "decode_step_bytes")
    _positive(data["hw"], "copy_bandwidth", "matmul_flops_per_s")
    assert len(data["latencies_s"]) == 2
    # tokens/s is what the batch produced over the measured latency
    assert math.isclose(data["output_tokens_per_s"], 2 * 6 / data["latency_mean_s"], rel_tol=1e-9)
    assert math.isclose(data["mbu"], data["decode_step_bytes"] / (data["tpot_median_ms"] / 1000)
                        / data["hw"]["copy_bandwidth"], rel_tol=1e-9)
    assert data["ttft_median_ms"] < data["latency_mean_s"] * 1000
    assert data["engine"]["compilations_during_measurement"] == 0
    assert res["tpot_median_ms"] == data["tpot_median_ms"]


def test_throughput_json(llm, results_dir, tmp_path):
    from jaxllm.bench.throughput import run_throughput

    out = results_dir / "tp.json"
    n, n_in, n_out = 6, 20, 5
    trace = tmp_path / "trace"
    run_throughput(_args(num_prompts=n, input_len=n_in, output_len=n_out, output_json=str(out),
                         profile=str(trace)), llm=llm)
    data = json.loads(out.read_text())
    assert any(files for _, _, files in os.walk(trace))          # a JAX profiler trace was written
    assert data["num_requests"] == n
    assert data["total_output_tokens"] == n * n_out            # ignore_eos: exactly output_len each
    assert data["total_num_tokens"] == n * (n_in + n_out)
    _positive(data, "elapsed_time_s", "requests_per_second", "output_tokens_per_second", "tokens_per_second",
              "roofline_fraction")
    assert math.isclose(data["output_tokens_per_second"], n * n_out / data["elapsed_time_s"], rel_tol=1e-9)
    roof = data["roofline"]
    # concurrency: max_num_seqs=4 caps it (47 usable blocks / 2 blocks per 25-token sequence = 23)
    assert roof["concurrency"] == 4
    assert roof["decode_steps"] == 2 * (n_out - 1)            # waves of 4 and 2
    assert math.isclose(data["roofline_fraction"], roof["total_s"] / data["elapsed_time_s"], rel_tol=1e-9)
    assert 1 <= data["engine"]["peak_running"] <= 4


def test_latency_rejects_bad_sizes(llm):
    from jaxllm.bench.latency import run_latency

    with pytest.raises(ValueError, match="batch_size"):
        run_latency(_args(batch_size=0, input_len=4, output_len=4, num_iters=1, num_iters_warmup=0), llm=llm)
    with pytest.raises(ValueError, match="max_model_len"):
        run_latency(_args(batch_size=1, input_len=100, output_len=100, num_iters=1, num_iters_warmup=0), llm=llm)


def test_markdown_report(llm, results_dir):
    from jaxllm.bench import report
    from jaxllm.bench.latency import run_latency
    from jaxllm.bench.throughput import run_throughput

    if not (results_dir / "lat.json").exists():   # run alone (-k): make the inputs
        run_latency(_args(batch_size=1, input_len=8, output_len=3, num_iters=1, num_iters_warmup=0,
                          output_json=str(results_dir / "lat.json")), llm=llm)
    if not (results_dir / "tp.json").exists():
        run_throughput(_args(num_prompts=2, input_len=8, output_len=3, output_json=str(results_dir / "tp.json")),
                       llm=llm)
    lat = json.loads((results_dir / "lat.json").read_text())
    tp = json.loads((results_dir / "tp.json").read_text())
    md = report.render(str(results_dir))
    assert "## Latency" in md and "## Throughput" in md and "| lat.json |" in md and "| tp.json |" in md
    assert f"{lat['tpot_median_ms']:.2f}" in md
    assert f"{tp['output_tokens_per_second']:.1f}" in md
