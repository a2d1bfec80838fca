"""ServerMetrics: cumulative engine counters become counter increments; one registry per server."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from jaxllm.entrypoints.metrics import ServerMetrics


def samples(m: ServerMetrics) -> dict[str, float]:
    body, _ = m.render()
    return {s.name: s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples
            if not s.name.endswith("_created") and "le" not in s.labels}


def test_engine_counters_and_gauges():
    m = ServerMetrics("tiny")
    m.on_stats({"kv_blocks_total": 10, "kv_blocks_free": 4, "num_requests_running": 3, "num_requests_waiting": 2,
                "prefix_cache_queries": 100, "prefix_cache_hits": 40, "num_preemptions": 1})
    m.on_stats({"kv_blocks_total": 10, "kv_blocks_free": 10, "prefix_cache_queries": 150,
                "prefix_cache_hits": 40, "num_preemptions": 3})
    s = samples(m)
    assert s["jaxllm:prefix_cache_queries_total"] == 150 and s["jaxllm:prefix_cache_hits_total"] == 40
    assert s["jaxllm:num_preemptions_total"] == 3
    assert s["jaxllm:kv_cache_usage_perc"] == 0.0 and s["jaxllm:num_requests_running"] == 0


def test_request_histograms_and_log_line():
    m = ServerMetrics("tiny")
    m.on_stats({"kv_blocks_total": 8, "kv_blocks_free": 2, "num_requests_running": 5, "num_requests_waiting": 1})
    m.on_first_token(0.05, 0.01, num_prompt_tokens=7)
    m.on_tokens(1, None)
    m.on_tokens(2, 0.02)
    m.on_finished(0.5, "length")
    s = samples(m)
    assert s["jaxllm:prompt_tokens_total"] == 7 and s["jaxllm:generation_tokens_total"] == 3
    assert s["jaxllm:time_to_first_token_seconds_count"] == 1 and s["jaxllm:time_to_first_token_seconds_sum"] == 0.05
    assert s["jaxllm:inter_token_latency_seconds_count"] == 2  # 2 tokens in one 20 ms chunk
    assert abs(s["jaxllm:inter_token_latency_seconds_sum"] - 0.02) < 1e-9
    assert s["jaxllm:e2e_request_latency_seconds_sum"] == 0.5
    assert s["jaxllm:request_queue_time_seconds_sum"] == 0.01
    assert s["jaxllm:request_success_total"] == 1
    line = m.log_line()
    assert "Running: 5 reqs" in line and "Waiting: 1 reqs" in line and "KV cache usage: 75.0%" in line
    assert "Avg generation throughput" in m.log_line()  # the window resets
    assert "Avg generation throughput: 0.0" in m.log_line()


def test_registries_are_independent():
    a, b = ServerMetrics("a"), ServerMetrics("b")
    a.on_tokens(5, None)
    assert samples(a)["jaxllm:generation_tokens_total"] == 5
    assert samples(b)["jaxllm:generation_tokens_total"] == 0


def test_serve_options_and_flags_are_validated():
    import argparse

    import pytest

    from jaxllm.entrypoints.serve import ServeOptions, _non_default_settings, add_serve_flags, options_from_args

    for kw, field in [({"grpc_port": 70000}, "grpc_port"), ({"shutdown_timeout": -1}, "shutdown_timeout"),
                      ({"max_queued_requests": 0}, "max_queued_requests"), ({"ssl_certfile": "c"}, "ssl_certfile"),
                      ({"grpc_port": None, "http_port": None}, "grpc_port")]:
        with pytest.raises(ValueError, match=field):
            ServeOptions(**kw)
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    args = p.parse_args(["--http-port", "-1", "--api-key", "k3y", "--max-queued-requests", "5"])
    opts = options_from_args(args)
    assert opts.http_port is None and opts.grpc_port == 50051 and opts.max_queued_requests == 5
    shown = _non_default_settings(args, p)
    assert shown == {"http_port": -1, "api_key": "***", "max_queued_requests": 5}
