"""Markdown summary of a directory of `jaxllm bench` / `tools/bench_hf_peer.py` JSON results.

    python -m jaxllm.bench.report RESULTS_DIR [--out RESULTS_DIR/summary.md]

One table per kind (hw probe, latency, throughput, HF peer); each row names its JSON file.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _load(results_dir: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            out.append((os.path.basename(path), data))
    return out


def render(results_dir: str) -> str:
    items = _load(results_dir)
    lines: list[str] = [f"# jaxllm bench results ({results_dir})", ""]
    hw = [(n, d) for n, d in items if "copy_bandwidth" in d and "bench" not in d]
    lat = [(n, d) for n, d in items if d.get("bench") == "latency"]
    tp = [(n, d) for n, d in items if d.get("bench") == "throughput"]
    peer = [(n, d) for n, d in items if str(d.get("bench", "")).startswith("hf_peer")]
    serve = [(n, d) for n, d in items if d.get("bench") == "serve"]
    if hw:
        lines += ["## Hardware probe", "", "| file | device | copy GB/s (read+write) | bf16 matmul TFLOP/s (n) |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {d['device']} | {_f(d['copy_bandwidth'] / 1e9, 0)} | "
                  f"{_f(d['matmul_flops_per_s'] / 1e12)} ({d['matmul_n']}) |" for n, d in hw]
        lines.append("")
    if lat:
        lines += ["## Latency (jaxllm bench latency)", "",
                  "| file | model | batch | in/out | TTFT ms | TPOT ms | ITL ms | tok/s | MBU | copy GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['args'].get('model')} | {d['batch_size']} | {d['input_len']}/{d['output_len']} | "
                  f"{_f(d['ttft_median_ms'])} | {_f(d['tpot_median_ms'], 2)} | {_f(d['itl_median_ms'], 2)} | "
                  f"{_f(d['output_tokens_per_s'])} | {_f(d['mbu'], 3)} | {_f(d['hw']['copy_bandwidth'] / 1e9, 0)} |"
                  for n, d in lat]
        lines.append("")
    if tp:
        lines += ["## Throughput (jaxllm bench throughput)", "",
                  "| file | model | prompts × in/out | req/s | output tok/s | total tok/s | roofline output tok/s "
                  "| fraction of roofline | concurrency |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['args'].get('model')} | {d['num_prompts']} × {d['input_len']}/{d['output_len']} | "
                  f"{_f(d['requests_per_second'], 2)} | {_f(d['output_tokens_per_second'])} | "
                  f"{_f(d['tokens_per_second'])} | {_f(d['roofline']['output_tokens_per_s'])} | "
                  f"{_f(d['roofline_fraction'], 3)} | {d['roofline']['concurrency']} |" for n, d in tp]
        lines.append("")
    if peer:
        lines += ["## Hugging Face peer (tools/bench_hf_peer.py)", "",
                  "| file | model | method | in/out | output tok/s | TTFT ms | TPOT ms | transformers / torch |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['model']} | {d.get('method')} | {d['input_len']}/{d['output_len']} | "
                  f"{_f(d.get('output_tokens_per_second', d.get('output_tokens_per_s')))} | "
                  f"{_f(d.get('ttft_median_ms'))} | {_f(d.get('tpot_median_ms'), 2)} | "
                  f"{d['versions']['transformers']} / {d['versions']['torch']} |" for n, d in peer]
        lines.append("")
    pairs = [(d, h) for _, d in tp for _, h in peer
             if h.get("bench") == "hf_peer_throughput" and h.get("model") == d["args"].get("model")
             and (h["input_len"], h["output_len"], h.get("num_requests")) == (d["input_len"], d["output_len"],
                                                                                 d["num_prompts"])]
    pairs += [(d, h) for _, d in lat for _, h in peer
              if h.get("bench") == "hf_peer_latency" and h.get("model") == d["args"].get("model")
              and (h["input_len"], h["output_len"], h.get("batch_size")) == (d["input_len"], d["output_len"],
                                                                               d["batch_size"])]
    if pairs:
        lines += ["## jaxllm vs transformers (same preset, workload and device)", "",
                  "| model | workload | jaxllm | transformers | jaxllm / transformers |", "|---|---|---|---|---|"]
        for d, h in pairs:
            if d.get("bench") == "throughput":
                work = f"throughput {d['num_prompts']} × {d['input_len']}/{d['output_len']} (output tok/s)"
                a, b = d["output_tokens_per_second"], h["output_tokens_per_second"]
            else:
                work = f"latency batch {d['batch_size']} {d['input_len']}/{d['output_len']} (TPOT ms, lower is better)"
                a, b = d["tpot_median_ms"], h["tpot_median_ms"]
            ratio = a / b if a and b else None
            lines.append(f"| {d['args'].get('model')} | {work} | {_f(a, 2)} | {_f(b, 2)} | {_f(ratio, 2)} |")
        lines.append("")
    if serve:
        lines += ["## Serving (jaxllm bench serve)", "",
                  "| file | load | req/s | output tok/s | median TTFT ms | median TPOT ms | p99 E2EL ms |",
                  "|---|---|---|---|---|---|---|"]
        for n, d in serve:
            for r in d["runs"]:
                load = f"rate {r['request_rate'] if r['request_rate'] is not None else 'inf'}, " \
                       f"conc {r['max_concurrency']}"
                lines.append(f"| {n} | {load} | {_f(r['request_throughput'], 2)} | {_f(r['output_throughput'])} | "
                             f"{_f(r['ttft_median_ms'])} | {_f(r['tpot_median_ms'], 2)} | {_f(r['e2el_p99_ms'])} |")
        lines.append("")
    if len(lines) == 2:
        lines.append("(no results found)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir")
    p.add_argument("--out", default=None, help="write the markdown here too")
    args = p.parse_args(argv)
    text = render(args.results_dir)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
