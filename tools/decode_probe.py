"""Where does a small model's decode time go? `jaxllm bench latency` under several settings, one
subprocess each (XLA flags are per process), plus a profile of the first setting summarized by
tools/trace_summary.py.

    python tools/decode_probe.py --out DIR --model qwen2.5-0.5b \\
        --config "triton:8" --config "triton:1" --config "mosaic_gpu:8" \\
        --config "triton:8:--xla_gpu_enable_command_buffer=" -- <extra bench latency flags>

A config is BACKEND:DECODE_STEPS[:XLA_FLAGS]; each prints one line (TPOT, tok/s, MBU) and writes
DIR/probe_<i>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = "/tmp/decode_probe_trace"   # big (xplane.pb): kept off $OUT; the summary is printed


def child(argv: list[str]) -> int:
    """In the subprocess: the latency bench with num_decode_steps set (no CLI flag for it)."""
    sys.path.insert(0, ROOT)
    steps = int(os.environ["PROBE_DECODE_STEPS"])
    from jaxllm import LLM
    from jaxllm.bench.latency import run_latency
    from jaxllm.entrypoints.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["bench", "latency", *argv])
    kw = engine_kwargs(args)
    kw["num_decode_steps"] = steps
    llm = LLM(args.model, progress=False, **kw)
    run_latency(args, llm=llm)
    return 0


def main() -> int:
    if os.environ.get("PROBE_CHILD"):
        return child(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--config", action="append", required=True, help="BACKEND:DECODE_STEPS[:XLA_FLAGS]")
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--profile-first", action="store_true", help="profile the first config's measured run")
    p.add_argument("rest", nargs="*", help="extra `bench latency` flags (after --)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for i, cfg in enumerate(a.config):
        backend, steps, *flags = cfg.split(":", 2)
        env = dict(os.environ, PROBE_CHILD="1", PROBE_DECODE_STEPS=steps, PYTHONPATH=ROOT + os.pathsep +
                   os.environ.get("PYTHONPATH", ""))
        if flags and flags[0]:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags[0]).strip()
        js = os.path.join(a.out, f"probe_{i}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--attention-backend", backend,
               "--output-json", js, "--disable-tqdm", *a.rest]
        if i == 0 and a.profile_first:
            cmd += ["--profile", TRACE]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            rc, tail = r.returncode, (r.stdout + r.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            rc, tail = 124, str(e)[-500:]
        row = {"config": cfg, "rc": rc, "wall_s": round(time.time() - t0, 1)}
        if rc == 0 and os.path.exists(js):
            d = json.load(open(js))
            row.update(tpot_ms=round(d["tpot_median_ms"], 3), tok_s=round(d["output_tokens_per_s"], 1),
                       decode_tok_s=round(d["decode_tokens_per_s"], 1), mbu=round(d["mbu"], 3),
                       startup_s=round(d["engine"]["startup_time_s"], 1))
        else:
            row["tail"] = tail
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(os.path.join(a.out, "probe_summary.json"), "w"), indent=2)
    if a.profile_first and os.path.isdir(TRACE):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import trace_summary
        trace_summary.main([TRACE, "--top", "30",
                            "--json", os.path.join(a.out, "trace_summary.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
