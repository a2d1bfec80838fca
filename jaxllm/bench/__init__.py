"""`jaxllm bench`: latency, throughput and serving benchmarks with a measured roofline beside them.

Modules: ``hw`` (copy bandwidth / matmul rate probe), ``roofline`` (model cost formulas),
``latency``, ``throughput``, ``serve`` (the three subcommands), ``results`` (JSON, metadata,
percentiles), ``plot`` (matplotlib charts of serve sweeps), ``cli`` (``add_bench_args``).
"""
