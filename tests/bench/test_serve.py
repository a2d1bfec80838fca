"""`jaxllm bench serve` against an in-process server (tiny random Llama, HTTP on loopback)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from jaxllm.bench import serve as sb

ENGINE_KW = dict(max_num_seqs=4, max_model_len=128, num_kv_blocks=48, max_num_batched_tokens=32)
VOCAB = 384   # tests/conftest.py VOCAB_SIZE


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.entrypoints.serve import ServeOptions, ServerThread

    engine = LLMEngine(EngineConfig.create(model=tiny_llama_dir, **ENGINE_KW), progress=False)
    st = ServerThread(engine, ServeOptions(grpc_port=None, http_port=0)).start()
    yield st
    assert st.stop() == 0


def test_poisson_with_concurrency_cap(server):
    from jaxllm.bench.results import random_prompts

    n, n_in, n_out = 6, 10, 5
    m = asyncio.run(sb.benchmark(server.http_url, None, random_prompts(n, n_in, VOCAB, 0), n_out,
                                 request_rate=200.0, max_concurrency=2, goodput={"ttft": 1e3, "e2el": 1e3},
                                 disable_tqdm=True))
    assert m["completed"] == n and m["failed"] == 0
    assert m["total_output_tokens"] == n * n_out and m["total_input_tokens"] == n * n_in
    assert 1 <= m["peak_concurrency"] <= 2
    assert math.isclose(m["request_throughput"], n / m["duration_s"])
    assert m["request_goodput"] == m["request_throughput"]     # generous SLOs: every request is good
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < m[f"{name}_median_ms"] <= m[f"{name}_p99_ms"], name
    assert m["ttft_mean_ms"] < m["e2el_mean_ms"]


def test_cli_concurrency_sweep_with_plot_and_json(server, tmp_path):
    from jaxllm.entrypoints.cli import main

    png, out = tmp_path / "sweep.png", tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", server.http_url, "--num-prompts", "4", "--input-len", "8",
               "--output-len", "3", "--vocab-size", str(VOCAB), "--sweep", "concurrency:1,4",
               "--goodput", "ttft:0.001", "--plot", str(png), "--output-json", str(out), "--disable-tqdm"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "serve" and data["sweep"] == {"kind": "concurrency", "values": [1.0, 4.0]}
    assert [r["max_concurrency"] for r in data["runs"]] == [1, 4]
    assert data["runs"][0]["peak_concurrency"] == 1
    assert all(r["completed"] == 4 and r["total_output_tokens"] == 12 for r in data["runs"])
    assert all(r["request_goodput"] == 0 for r in data["runs"])   # nobody meets a 1 µs TTFT
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_metrics_by_hand():
    rs = [sb.RequestResult(success=True, prompt_len=4, output_tokens=3, ttft=0.1, latency=0.5, itl=[0.2, 0.2]),
          sb.RequestResult(success=True, prompt_len=4, output_tokens=5, ttft=0.3, latency=0.7, itl=[0.1] * 4),
          sb.RequestResult(success=False, error="HTTP 500: boom")]
    m = sb.compute_metrics(rs, 2.0, {"ttft": 0.2}, request_rate=math.inf, max_concurrency=None,
                           peak_concurrency=2)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["HTTP 500: boom"])
    assert m["total_output_tokens"] == 8 and m["output_throughput"] == 4.0
    assert m["request_goodput"] == 0.5                        # only the first meets TTFT <= 200 ms
    assert math.isclose(m["tpot_mean_ms"], 1000 * (0.2 + 0.1) / 2)   # (0.5-0.1)/2 and (0.7-0.3)/4
    assert math.isclose(m["e2el_median_ms"], 600.0)
    assert m["request_rate"] is None and m["request_rate_is_inf"]


@pytest.mark.parametrize("bad, field", [(["ttft"], "goodput"), (["latency:5"], "goodput"), (["ttft:-1"], "goodput"),
                                        (["ttft:x"], "goodput")])
def test_goodput_errors(bad, field):
    with pytest.raises(ValueError, match=field):
        sb.parse_goodput(bad)


def test_sweep_parse():
    assert sb.parse_sweep("rate:1,2.5,inf") == ("rate", [1.0, 2.5, math.inf])
    assert sb.parse_sweep(None) is None
    for bad in ("concurrency:0", "concurrency:1.5", "speed:1", "rate:", "rate:a"):
        with pytest.raises(ValueError, match="sweep"):
            sb.parse_sweep(bad)


def test_cli_launch_in_process_with_profile(tiny_llama_dir, tmp_path):
    """--launch serves --model in this process; --profile traces the measured region there."""
    import os

    from jaxllm.entrypoints.cli import main

    out, trace = tmp_path / "launch.json", tmp_path / "trace"
    engine = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_KW.items()]
    rc = main(["bench", "serve", "--launch", "--model", tiny_llama_dir, *engine, "--num-prompts", "3",
               "--input-len", "8", "--output-len", "3", "--vocab-size", str(VOCAB), "--request-rate", "100",
               "--profile", str(trace), "--output-json", str(out), "--disable-tqdm"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["completed"] == 3 and data["total_output_tokens"] == 9 and data["request_rate"] == 100.0
    assert data["base_url"].startswith("http://127.0.0.1:")
    assert any(files for _, _, files in os.walk(trace))


def test_cli_profile_needs_launch(server):
    from jaxllm.entrypoints.cli import main

    assert main(["bench", "serve", "--base-url", server.http_url, "--profile", "/tmp/x", "--disable-tqdm"]) == 2
