"""Hugging Face transformers + PyTorch peer of `jaxllm bench`: same preset, same workload, same GPU.

The model is built from the preset's config.json with random weights in bf16 (as jaxllm's
``--load-format dummy``), prompts are the same random token ids as ``jaxllm bench throughput``
draws (``jaxllm.bench.results.random_prompts`` with the same seed), and every request generates
exactly ``--output-len`` tokens (EOS disabled).

    # offline throughput: continuous batching (generate_batch) if this transformers has it,
    # else batched generate() with a static cache, --batch-size prompts at a time
    python tools/bench_hf_peer.py throughput --model llama-3.1-8b --num-prompts 1000 \
        --input-len 1024 --output-len 128 --output-json hf_tp.json
    # batch-1 decode: TTFT and TPOT = (t(out=N) - t(out=1)) / (N - 1), medians over --num-iters
    python tools/bench_hf_peer.py latency --model llama-3.1-8b --input-len 128 --output-len 128

``--method generate`` forces the static-cache path; ``--no-compile`` stops transformers from
torch.compile-ing the static-cache decode step (it does so by default).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("bench_hf_peer")


def build_model(model: str, dtype: str, attn: str | None):
    """Random-weight model of the preset's (or checkpoint directory's) config, on the GPU if any."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxllm.presets import resolve_preset

    path = resolve_preset(model)
    cfg = AutoConfig.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    kw = {"attn_implementation": attn} if attn else {}
    t0 = time.perf_counter()
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, **kw)
    m.eval()
    m.generation_config.eos_token_id = None   # random weights: never stop early (ignore_eos)
    logger.info("built %s (%.2fB params, %s) on %s in %.1fs", model, sum(p.numel() for p in m.parameters()) / 1e9,
                dtype, device, time.perf_counter() - t0)
    return m, cfg, device


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _gen_config(output_len: int, *, continuous: bool = False, compile_: bool = True):
    """Greedy, exactly ``output_len`` tokens: EOS disabled (-1 for generate_batch, None for generate)."""
    from transformers import GenerationConfig
    g = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1 if continuous else None,
                         pad_token_id=0, cache_implementation=None if continuous else "static")
    if not compile_:
        g.disable_compile = True
    return g


def run_generate_batch(model, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    """transformers' continuous batching. Returns (seconds, output tokens); raises if it dropped requests."""
    gen = model.generate_batch
    params = inspect.signature(gen).parameters
    kw = {"generation_config": _gen_config(output_len, continuous=True)}
    if "progress_bar" in params:
        kw["progress_bar"] = True
    t0 = time.perf_counter()
    out = gen(inputs=prompts, **kw)
    wall = time.perf_counter() - t0
    toks = [len(r.generated_tokens) for r in out.values() if getattr(r, "error", None) is None]
    if len(toks) != len(prompts) or sum(toks) != len(prompts) * output_len:
        raise RuntimeError(f"generate_batch returned {len(toks)}/{len(prompts)} requests, {sum(toks)} tokens "
                           f"(expected {len(prompts) * output_len})")
    # The call also sets up the paged cache and captures CUDA graphs (its warm-up); time the requests
    # themselves: first request created → last request finished (perf_counter stamps of the outputs).
    try:
        created = min(r.created_time for r in out.values())
        finished = max(r.lifespan[1] for r in out.values())
        elapsed = finished - created if 0 < finished - created <= wall else wall
    except (AttributeError, TypeError, IndexError, ValueError):
        elapsed = wall
    logger.info("generate_batch: %.2fs for the requests, %.2fs for the whole call", elapsed, wall)
    return elapsed, sum(toks)


def run_static_generate(model, prompts: list[list[int]], output_len: int, batch_size: int, device: str,
                        compile_: bool) -> tuple[float, int]:
    """Batched generate() with a static cache, ``batch_size`` equal-length prompts at a time."""
    import torch
    from tqdm.auto import tqdm

    total = 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate batches"):
        x = torch.tensor(prompts[i:i + batch_size], device=device)
        with torch.inference_mode():
            y = model.generate(x, generation_config=_gen_config(output_len, compile_=compile_))
        total += (y.shape[1] - x.shape[1]) * y.shape[0]
    _sync(device)
    return time.perf_counter() - t0, total


def cmd_throughput(args, model, device) -> dict:
    from jaxllm.bench.results import random_prompts

    vocab = model.config.vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    method = args.method
    if method == "auto":
        method = "generate_batch" if hasattr(model, "generate_batch") else "generate"
    res: dict = {"method": method}
    if method == "generate_batch":
        try:
            elapsed, n_out = run_generate_batch(model, prompts, args.output_len)
        except Exception as e:  # an older API or an unsupported attention: fall back, and say so
            logger.warning("generate_batch failed (%s: %s); falling back to static-cache generate()",
                           type(e).__name__, e)
            res["generate_batch_error"] = f"{type(e).__name__}: {e}"[:500]
            method = res["method"] = "generate"
    if method == "generate":
        warm = random_prompts(args.batch_size, args.input_len, vocab, args.seed, 1)
        run_static_generate(model, warm, min(4, args.output_len), args.batch_size, device, not args.no_compile)
        elapsed, n_out = run_static_generate(model, prompts, args.output_len, args.batch_size, device,
                                             not args.no_compile)
        res["batch_size"] = args.batch_size
    n = args.num_prompts
    res.update({"elapsed_time_s": elapsed, "num_requests": n, "total_output_tokens": n_out,
                "total_num_tokens": n_out + n * args.input_len, "requests_per_second": n / elapsed,
                "output_tokens_per_second": n_out / elapsed,
                "tokens_per_second": (n_out + n * args.input_len) / elapsed})
    print(f"[hf-peer] {method}: {n} prompts x ({args.input_len} in / {args.output_len} out) in {elapsed:.2f}s: "
          f"{res['output_tokens_per_second']:.1f} output tok/s, {res['tokens_per_second']:.1f} total tok/s")
    return res


def cmd_latency(args, model, device) -> dict:
    import torch

    from jaxllm.bench.results import random_prompts

    b = args.batch_size
    compile_ = not args.no_compile

    def timed(out_len: int, it: int) -> float:
        x = torch.tensor(random_prompts(b, args.input_len, model.config.vocab_size, args.seed, it), device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = model.generate(x, generation_config=_gen_config(out_len, compile_=compile_))
        _sync(device)
        assert y.shape[1] - x.shape[1] == out_len
        return time.perf_counter() - t0

    for it in range(args.num_iters_warmup):
        timed(args.output_len, 1_000_000 + it)
        timed(1, 2_000_000 + it)
    full = [timed(args.output_len, it) for it in range(args.num_iters)]
    first = [timed(1, 100_000 + it) for it in range(args.num_iters)]
    ttft = statistics.median(first)
    tpot = (statistics.median(full) - ttft) / max(args.output_len - 1, 1)
    res = {"method": "generate(static cache)" + ("" if compile_ else ", no compile"), "batch_size": b,
           "latency_median_s": statistics.median(full), "latencies_s": full, "ttft_median_ms": ttft * 1000,
           "tpot_median_ms": tpot * 1000, "output_tokens_per_s": b * args.output_len / statistics.median(full),
           "decode_tokens_per_s": b / tpot if tpot > 0 else None}
    print(f"[hf-peer] latency batch {b}, {args.input_len} in / {args.output_len} out: TTFT {ttft * 1000:.1f} ms, "
          f"TPOT {tpot * 1000:.2f} ms, {res['output_tokens_per_s']:.1f} tok/s")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "latency"])
    p.add_argument("--model", default="llama-3.1-8b", help="a jaxllm preset or a checkpoint dir (config only)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager, flash_attention_2")
    p.add_argument("--method", default="auto", choices=["auto", "generate_batch", "generate"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None,
                   help="static-cache generate: prompts per batch (throughput default 64; latency default 1)")
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="no torch.compile of the static-cache decode step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size is None:
        args.batch_size = 64 if args.mode == "throughput" else 1
    for name in ("num_prompts", "input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            print(f"bench_hf_peer: error: {name}: must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2

    import torch
    import transformers

    model, cfg, device = build_model(args.model, args.dtype, args.attn_implementation)
    res = cmd_throughput(args, model, device) if args.mode == "throughput" else cmd_latency(args, model, device)
    result = {"bench": f"hf_peer_{args.mode}", "model": args.model, "dtype": args.dtype,
              "input_len": args.input_len, "output_len": args.output_len,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
              "has_generate_batch": hasattr(model, "generate_batch"),
              "attn_implementation": model.config._attn_implementation,
              "args": vars(args), **res}
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
