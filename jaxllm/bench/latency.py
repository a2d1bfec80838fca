"""`jaxllm bench latency`: one batch of ``--batch-size`` random prompts, decoded to ``--output-len``.

Per measured iteration (after ``--num-iters-warmup`` unmeasured ones, each with fresh random
prompts so the prefix cache never hits) the engine is stepped directly and every step is timed:

* TTFT: per request, arrival → first token (the engine's RequestMetrics).
* TPOT: the median time per output token of the *decode* steps (steps taken after every request
  of the batch had its first token; a step that yields k tokens per request counts k tokens).
* ITL: per request, the gaps between successive outputs, each divided by the tokens it carried.
* tokens/s: ``batch_size * output_len / end-to-end latency``.
* MBU: bytes one decode step reads (weights + KV at the mean decode context ``input_len +
  output_len / 2``) / TPOT / the copy bandwidth measured by :mod:`jaxllm.bench.hw` in this process
  (after the measured iterations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from jaxllm.bench import roofline
from jaxllm.bench.results import maybe_profile, print_table, random_prompts, run_metadata, summarize, write_json


@dataclass
class IterationTimes:
    e2e_s: float
    ttft_s: list[float]
    decode_step_s_per_token: list[float]      # one entry per decode step
    itl_s: list[float] = field(default_factory=list)


def run_iteration(engine, prompts: list[list[int]], output_len: int, tag: str) -> IterationTimes:
    """Decode one batch to completion, timing every ``engine.step()``."""
    from jaxllm.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sp)
    ids = {f"{tag}-{i}" for i in range(len(prompts))}
    started: set[str] = set()
    last_out: dict[str, float] = {}
    ttft: dict[str, float] = {}
    itl: list[float] = []
    decode: list[float] = []
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        te = time.perf_counter()
        all_started_before = len(started) == len(ids)
        new_tokens = active = 0
        for out in outs:
            if out.request_id not in ids:
                continue
            n = sum(len(c.delta_token_ids) for c in out.outputs)
            if n == 0:
                continue
            new_tokens += n
            active += 1
            rid = out.request_id
            if rid not in started:
                started.add(rid)
                m = out.metrics
                ttft[rid] = (m.first_token_time - m.arrival_time) if m and m.first_token_time else te - t0
            else:
                itl.append((te - last_out[rid]) / n)
            last_out[rid] = te
        if all_started_before and new_tokens:
            decode.append((te - ts) * active / new_tokens)   # seconds per token of one request
    return IterationTimes(e2e_s=time.perf_counter() - t0, ttft_s=list(ttft.values()),
                          decode_step_s_per_token=decode, itl_s=itl)


def run_latency(args: argparse.Namespace, llm=None) -> dict:
    """Run the latency benchmark; ``llm`` reuses an existing ``LLM`` (tests), else one is built."""
    from jaxllm.bench import hw

    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"num_iters_warmup: must be >= 0, got {args.num_iters_warmup}")
    if llm is None:
        from jaxllm import LLM
        from jaxllm.entrypoints.cli import engine_kwargs
        llm = LLM(args.model, progress=not args.disable_tqdm, **engine_kwargs(args))
    engine = llm.llm_engine
    cost = roofline.ModelCost.from_engine(engine)
    b, n_in, n_out = args.batch_size, args.input_len, args.output_len
    if n_in + n_out > engine.max_model_len:
        raise ValueError(f"input_len: input_len + output_len = {n_in + n_out} exceeds max_model_len="
                         f"{engine.max_model_len}")

    def prompts(it: int) -> list[list[int]]:
        return random_prompts(b, n_in, engine.vocab_size, args.seed, it)

    for it in tqdm(range(args.num_iters_warmup), desc="Warm-up", disable=args.disable_tqdm):
        run_iteration(engine, prompts(1_000_000 + it), n_out, f"warm{it}")
    comp_before = engine.num_compilations
    iters: list[IterationTimes] = []
    with maybe_profile(args.profile):
        for it in tqdm(range(args.num_iters), desc="Profiling iterations", disable=args.disable_tqdm):
            iters.append(run_iteration(engine, prompts(it), n_out, f"it{it}"))

    # After the measured region (see jaxllm.bench.hw): the engine's KV sizing is not disturbed.
    probe = hw.probe(copy_bytes=args.hw_copy_bytes, matmul_n=args.hw_matmul_n)
    e2e = [x.e2e_s for x in iters]
    step_times = [t for x in iters for t in x.decode_step_s_per_token]
    tpot = statistics.median(step_times) if step_times else float("nan")
    step_bytes = roofline.decode_step_bytes(cost, [n_in + n_out / 2] * b)
    ttft_all = [t for x in iters for t in x.ttft_s]
    prefill_flops = b * roofline.prefill_flops(cost, n_in)
    result = {
        "bench": "latency",
        **run_metadata(args),
        "hw": probe.to_dict(),
        "model_cost": cost.to_dict(),
        "engine": {"num_kv_blocks": engine.runner.num_blocks, "startup_time_s": engine.startup_time_s,
                   "compile_time_s": engine.compile_time_s, "load_time_s": engine.load_time_s,
                   "num_compilations": engine.num_compilations,
                   "compilations_during_measurement": engine.num_compilations - comp_before},
        "batch_size": b, "input_len": n_in, "output_len": n_out, "num_iters": args.num_iters,
        "latency_mean_s": float(np.mean(e2e)),
        "latencies_s": e2e,
        "percentiles_latency_s": {str(q): float(np.percentile(e2e, q)) for q in (10, 25, 50, 75, 90, 99)},
        "tpot_median_ms": tpot * 1000,
        "output_tokens_per_s": b * n_out / float(np.mean(e2e)),
        "decode_tokens_per_s": b / tpot if tpot > 0 else float("nan"),
        "decode_step_bytes": step_bytes,
        "mbu": step_bytes / tpot / probe.copy_bandwidth if tpot > 0 else float("nan"),
        "prefill_mfu": (prefill_flops / statistics.median(ttft_all) / probe.matmul_flops_per_s
                        if ttft_all else float("nan")),
        **summarize(ttft_all, "ttft"),
        **summarize(step_times, "tpot"),
        **summarize([t for x in iters for t in x.itl_s], "itl"),
    }
    print_table("Latency Benchmark Result", [
        ("Device:", result["device"]),
        ("Batch size / input / output:", f"{b} / {n_in} / {n_out}"),
        ("Avg latency (s):", result["latency_mean_s"]),
        ("Median TTFT (ms):", result["ttft_median_ms"]),
        ("Median TPOT (ms):", result["tpot_median_ms"]),
        ("Median ITL (ms):", result["itl_median_ms"]),
        ("Output token throughput (tok/s):", result["output_tokens_per_s"]),
        ("Decode bytes per step (GB):", step_bytes / 1e9),
        ("Measured copy bandwidth (GB/s):", probe.copy_bandwidth / 1e9),
        ("MBU:", result["mbu"]),
        ("Compilations during measurement:", result["engine"]["compilations_during_measurement"]),
    ])
    write_json(args.output_json, result)
    return result


def add_latency_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--input-len", type=int, default=32)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--num-iters-warmup", type=int, default=3)
    g.add_argument("--num-iters", type=int, default=10)
