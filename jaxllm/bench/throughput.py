"""`jaxllm bench throughput`: offline throughput of ``--num-prompts`` random prompts, with a roofline.

All requests (``--input-len`` random token ids, ``--output-len`` tokens with ``ignore_eos``) are
queued at once and the engine steps until they finish; as ``vllm bench throughput`` it reports
requests/s, output tokens/s and total (prompt + output) tokens/s.

Beside it: the roofline of :mod:`jaxllm.bench.roofline` at the matmul rate and copy bandwidth
measured in this process, with the decode concurrency that the KV capacity and ``max_num_seqs``
allow, and the fraction of that roofline the engine achieved (roofline time / measured time).
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

from jaxllm.bench import roofline
from jaxllm.bench.results import maybe_profile, print_table, random_prompts, run_metadata, write_json


_HOST_KEYS = ("num_steps", "num_steps_overlapped", "num_sync_fallbacks", "time_schedule_s", "time_pack_s",
              "time_dispatch_s", "time_wait_s", "time_postprocess_s", "time_host_s")


def run_throughput(args: argparse.Namespace, llm=None) -> dict:
    """Run the throughput benchmark; ``llm`` reuses an existing ``LLM`` (tests), else one is built."""
    from jaxllm.bench import hw
    from jaxllm.sampling_params import SamplingParams

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if llm is None:
        from jaxllm import LLM
        from jaxllm.entrypoints.cli import engine_kwargs
        llm = LLM(args.model, progress=not args.disable_tqdm, **engine_kwargs(args))
    engine = llm.llm_engine
    cost = roofline.ModelCost.from_engine(engine)
    n, n_in, n_out = args.num_prompts, args.input_len, args.output_len
    if n_in + n_out > engine.max_model_len:
        raise ValueError(f"input_len: input_len + output_len = {n_in + n_out} exceeds max_model_len="
                         f"{engine.max_model_len}")
    prompts = random_prompts(n, n_in, engine.vocab_size, args.seed)
    sp = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True, detokenize=False)
    stats0 = engine.stats()
    comp_before = engine.num_compilations

    bar = tqdm(total=n, desc="Processed prompts", disable=args.disable_tqdm, dynamic_ncols=True)
    out_tokens = prompt_tokens = finished = steps = peak_running = 0
    with maybe_profile(args.profile):
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"tp-{i}", p, sp)
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps += 1
            peak_running = max(peak_running, engine.scheduler.stats()["num_requests_running"])
            for out in outs:
                if out.finished:
                    finished += 1
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    prompt_tokens += len(out.prompt_token_ids)
                    bar.update(1)
        elapsed = time.perf_counter() - t0
    bar.close()
    # After the measured region (see jaxllm.bench.hw): the engine's KV sizing is not disturbed.
    probe = hw.probe(copy_bytes=args.hw_copy_bytes, matmul_n=args.hw_matmul_n)
    stats1 = engine.stats()

    sched = engine.config.scheduler_config
    conc = min(n, roofline.kv_concurrency(engine.runner.num_blocks, engine.config.cache_config.block_size,
                                          n_in + n_out, sched.max_num_seqs))
    roof = roofline.throughput_roofline(cost, num_prompts=n, input_len=n_in, output_len=n_out, concurrency=conc,
                                        matmul_flops_per_s=probe.matmul_flops_per_s,
                                        bandwidth=probe.copy_bandwidth)
    result = {
        "bench": "throughput",
        **run_metadata(args),
        "hw": probe.to_dict(),
        "model_cost": cost.to_dict(),
        "engine": {"num_kv_blocks": engine.runner.num_blocks, "max_num_seqs": sched.max_num_seqs,
                   "max_num_batched_tokens": sched.max_num_batched_tokens,
                   "startup_time_s": engine.startup_time_s, "compile_time_s": engine.compile_time_s,
                   "load_time_s": engine.load_time_s, "num_compilations": engine.num_compilations,
                   "compilations_during_measurement": engine.num_compilations - comp_before,
                   "num_preemptions": stats1["num_preemptions"] - stats0["num_preemptions"],
                   "num_steps": steps, "peak_running": peak_running},
        # Host seconds per phase over the measured run (LLMEngine.step timings): with async
        # scheduling, host time that exceeds the device's shows up as GPU idle time.
        "host": {k: stats1[k] - stats0.get(k, 0) for k in _HOST_KEYS if k in stats1},
        "num_prompts": n, "input_len": n_in, "output_len": n_out,
        "elapsed_time_s": elapsed,
        "num_requests": finished,
        "total_num_tokens": prompt_tokens + out_tokens,
        "total_output_tokens": out_tokens,
        "requests_per_second": finished / elapsed,
        "tokens_per_second": (prompt_tokens + out_tokens) / elapsed,
        "output_tokens_per_second": out_tokens / elapsed,
        "roofline": roof.to_dict(),
        "roofline_fraction": roof.total_s / elapsed,
    }
    print_table("Throughput Benchmark Result", [
        ("Device:", result["device"]),
        ("Prompts x (input / output):", f"{n} x ({n_in} / {n_out})"),
        ("Elapsed (s):", elapsed),
        ("Host ms/step: sched, pack, dispatch, wait, post:", ", ".join(
            f"{1e3 * result['host'].get(k, 0.0) / max(result['host'].get('num_steps', 1), 1):.2f}" for k in
            ("time_schedule_s", "time_pack_s", "time_dispatch_s", "time_wait_s", "time_postprocess_s"))),
        ("Request throughput (req/s):", result["requests_per_second"]),
        ("Output token throughput (tok/s):", result["output_tokens_per_second"]),
        ("Total token throughput (tok/s):", result["tokens_per_second"]),
        ("Roofline concurrency (KV / max_num_seqs):", conc),
        ("Roofline prefill (s) at matmul TFLOP/s:", f"{roof.prefill_s:.2f} at {probe.matmul_flops_per_s / 1e12:.1f}"),
        ("Roofline decode (s) at copy GB/s:", f"{roof.decode_s:.2f} at {probe.copy_bandwidth / 1e9:.0f}"),
        ("Roofline output tok/s:", roof.output_tokens_per_s),
        ("Fraction of roofline achieved:", result["roofline_fraction"]),
        ("Preemptions / compilations during run:",
         f"{result['engine']['num_preemptions']} / {result['engine']['compilations_during_measurement']}"),
    ])
    write_json(args.output_json, result)
    return result


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("throughput")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=1024)
    g.add_argument("--output-len", type=int, default=128)
