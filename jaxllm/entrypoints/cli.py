"""The `jaxllm` command: generate, serve, bench, convert.

Engine flags are declared once (``add_engine_args``) and turned into ``LLM``/``EngineConfig``
keyword arguments by ``engine_kwargs``, so every subcommand takes the same flags as vLLM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DEFAULT_MODEL = "demo"


def add_engine_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None if model_required else DEFAULT_MODEL, required=model_required,
                   help="local Hugging Face checkpoint directory, or a shipped name (demo, demo-draft, "
                        "a preset such as llama-3.1-8b with --load-format dummy)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 (32 on CPU)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step; default: max(2048, min(max_model_len, 8192)) (512 on CPU)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy", "orbax"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--attention-backend", default="auto")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and dispatch step t+1 before reading step t's tokens (hides host time); "
                        "on by default, except with several processes")
    g.add_argument("--num-decode-steps", type=int, default=8,
                   help="decode steps per dispatch when every running request decodes (1 disables)")
    g.add_argument("--compilation-cache-dir", default=None,
                   help="JAX persistent compilation cache (default ~/.cache/jaxllm/xla; '' disables)")
    # Multi-host (docs/multihost.md): the same command on every process; process 0 leads.
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0's coordinator (the same on every process)")
    g.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    g.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's index; 0 leads, the others serve its steps and exit")


_ENGINE_KEYS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                "num_kv_blocks", "gpu_memory_utilization", "enable_prefix_caching", "scheduling_policy",
                "load_format", "seed", "tensor_parallel_size", "attention_backend", "compilation_cache_dir",
                "async_scheduling", "num_decode_steps")


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = {k: getattr(args, k) for k in _ENGINE_KEYS if hasattr(args, k)}
    for k in ("coordinator_address", "num_processes", "process_id"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    return kw


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("-n", "--n", type=int, default=1)


def sampling_params_from(args: argparse.Namespace, overrides: dict | None = None):
    from jaxllm.sampling_params import SamplingParams
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              min_p=args.min_p, repetition_penalty=args.repetition_penalty,
              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
              seed=args.sampling_seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
              ignore_eos=args.ignore_eos, min_tokens=args.min_tokens, logprobs=args.logprobs, n=args.n)
    kw.update(overrides or {})
    return SamplingParams(**kw)


def _read_prompts(args) -> list[tuple[str | list[int], dict]]:
    items: list[tuple[str | list[int], dict]] = [(p, {}) for p in args.prompts]
    if args.prompts_file:
        with open(args.prompts_file) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                obj = json.loads(line)
                if isinstance(obj, str):
                    items.append((obj, {}))
                elif isinstance(obj, dict) and ("prompt" in obj or "prompt_token_ids" in obj):
                    prompt = obj.pop("prompt", None)
                    if prompt is None:
                        prompt = obj.pop("prompt_token_ids")
                    items.append((prompt, obj))
                else:
                    raise ValueError(f"--prompts-file line {n}: expected a JSON string or an object with "
                                     f"'prompt' (text) or 'prompt_token_ids'")
    if not items:
        raise ValueError("no prompts: give them as arguments or with --prompts-file")
    return items


def cmd_generate(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from jaxllm.client import generate_via_server
        return generate_via_server(args)
    from jaxllm import LLM
    from jaxllm.engine.outputs import RequestOutput

    items = _read_prompts(args)
    t0 = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    engine = llm.llm_engine
    t_ready = time.perf_counter()
    tok = llm.get_tokenizer()
    prompts = []
    for prompt, _ in items:
        if args.chat:
            if tok is None or not isinstance(prompt, str):
                raise ValueError("--chat needs text prompts and a tokenizer with a chat template")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            prompt = list(tok.encode(text, add_special_tokens=False))
        prompts.append(prompt)
    params = [sampling_params_from(args, ov) for _, ov in items]

    results: dict[str, RequestOutput] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    t_gen = time.perf_counter()
    first_token_at = None
    stream = args.stream and not args.json
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_token_at is None and any(c.token_ids for c in out.outputs):
                first_token_at = time.perf_counter()
            if stream:
                for c in out.outputs:
                    if c.delta_text:
                        prefix = f"[{out.request_id}" + (f".{c.index}" if len(out.outputs) > 1 else "") + "] " \
                            if len(prompts) > 1 or len(out.outputs) > 1 else ""
                        sys.stdout.write(prefix + c.delta_text + ("\n" if prefix else ""))
                        sys.stdout.flush()
            if out.finished:
                results[out.request_id] = out
    t_end = time.perf_counter()
    if stream and len(prompts) == 1:
        sys.stdout.write("\n")
    for i in range(len(prompts)):
        out = results[str(i)]
        if args.json:
            print(json.dumps({
                "prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                             "cumulative_logprob": c.cumulative_logprob,
                             "logprobs": [{str(k): v for k, v in d.items()} for d in c.logprobs]
                             if c.logprobs is not None else None} for c in out.outputs]}))
        elif not stream:
            for c in out.outputs:
                shown = out.prompt if isinstance(out.prompt, str) and not args.chat else ""
                print(f"{shown}{c.text}" if shown else c.text)
                if len(prompts) > 1 or len(out.outputs) > 1:
                    print("-" * 40)
    n_out = sum(len(c.token_ids) for o in results.values() for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in results.values())
    gen_s = t_end - t_gen
    ttft = (first_token_at - t_gen) if first_token_at else float("nan")
    print(f"[jaxllm] start-up {t_ready - t0:.1f}s (load {engine.load_time_s:.1f}s, compile "
          f"{engine.compile_time_s:.1f}s); {len(prompts)} prompts, {n_in} prompt + {n_out} generated tokens in "
          f"{gen_s:.2f}s: {n_out / gen_s:.1f} output tok/s, {(n_in + n_out) / gen_s:.1f} total tok/s, "
          f"TTFT {ttft * 1000:.0f} ms; compilations {engine.num_compilations}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="A vLLM-class LLM inference engine on JAX.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline (or from a running server with --server)")
    g.add_argument("prompts", nargs="*", help="prompts (text)")
    g.add_argument("--prompts-file", help="JSON lines: a string, or {\"prompt\": ..., <sampling overrides>}")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--server", default=None, metavar="HOST:PORT", help="send to a running jaxllm gRPC server")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    for name, module, adder in (("serve", "jaxllm.entrypoints.serve", "add_serve_args"),
                                ("bench", "jaxllm.bench.cli", "add_bench_args"),
                                ("convert", "jaxllm.entrypoints.convert", "add_convert_args")):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError:
            continue
        getattr(mod, adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxllm {args.command}: error: {e}", file=sys.stderr)
        return 2


def _transformers_without_torch() -> None:
    """Keep torch out of the CLI's process: the engine never runs it, but transformers imports it
    (1-6 s, most of a warm start's load time on a CUDA machine) as soon as a config class is
    loaded if torch is installed. Done only before transformers' first import, so nothing in this
    process has seen torch through it; ``JAXLLM_TRANSFORMERS_TORCH=1`` turns it off."""
    if os.environ.get("JAXLLM_TRANSFORMERS_TORCH", "0") == "1" or "transformers" in sys.modules:
        return
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except ImportError:
        return
    iu.is_torch_available = tu.is_torch_available = lambda: False


def cli_entry() -> int:
    """The ``jaxllm`` console script (and ``python -m jaxllm.entrypoints.cli``)."""
    _transformers_without_torch()
    return main()


if __name__ == "__main__":
    sys.exit(cli_entry())
