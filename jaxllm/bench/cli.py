"""`jaxllm bench {latency,throughput,serve}`: the subparsers (vLLM's `vllm bench` flags where they exist).

``latency`` and ``throughput`` build an engine from the usual engine flags (``add_engine_args``);
``serve`` is a client of a running ``jaxllm serve`` (or of one it ``--launch``-es in-process).
"""

from __future__ import annotations

import argparse


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-json", default=None, metavar="PATH", help="write every number, device, versions, args")
    g.add_argument("--profile", default=None, metavar="DIR", help="write a JAX profiler trace of the measured region")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def _add_hw(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware probe (measured in-process for MBU / roofline)")
    g.add_argument("--hw-copy-bytes", type=int, default=None, help="bytes per copy buffer (default 1 GiB; CPU 16 MiB)")
    g.add_argument("--hw-matmul-n", type=int, default=None, help="matmul size n (default 8192; CPU 256)")


def _latency(args):
    from jaxllm.bench.latency import run_latency
    run_latency(args)
    return 0


def _throughput(args):
    from jaxllm.bench.throughput import run_throughput
    run_throughput(args)
    return 0


def _serve(args):
    from jaxllm.bench.serve import run_serve_bench
    run = run_serve_bench(args)
    return 0 if all(r["failed"] == 0 for r in run["runs"]) else 1


def add_bench_args(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` with sub-subcommands ``latency``, ``throughput`` and ``serve`` (each sets ``func``)."""
    from jaxllm.bench.latency import add_latency_args
    from jaxllm.bench.serve import add_serve_bench_args
    from jaxllm.bench.throughput import add_throughput_args
    from jaxllm.entrypoints.cli import add_engine_args

    bench = subparsers.add_parser("bench", help="benchmark latency, offline throughput or a server")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    lat = sub.add_parser("latency", help="batch decode latency: TTFT, TPOT, ITL, tokens/s, MBU")
    add_engine_args(lat)
    add_latency_args(lat)
    _add_hw(lat)
    _add_common(lat)
    lat.set_defaults(func=_latency)

    tp = sub.add_parser("throughput", help="offline throughput of random prompts, with a roofline")
    add_engine_args(tp)
    add_throughput_args(tp)
    _add_hw(tp)
    _add_common(tp)
    tp.set_defaults(func=_throughput)

    sv = sub.add_parser("serve", help="online serving benchmark against the OpenAI HTTP API")
    add_engine_args(sv)   # used with --launch; --model also names the model to benchmark
    add_serve_bench_args(sv)
    _add_common(sv)
    sv.add_argument("--plot", default=None, metavar="PNG", help="throughput and latency against the sweep")
    sv.set_defaults(func=_serve)
    return bench
