#!/usr/bin/env bash
# Session 3: where the offline-throughput and the 64-row decode time go. Profiles (a) `bench
# throughput` on 300 x 1024/128 at the 2048-token budget and (b) `bench latency` at batch 64,
# 256 in / 256 out (decode steps of 64 rows without serving's arrival waves), and prints
# tools/trace_summary.py for each (device busy %, idle gaps, top kernels). FULL_PROMPTS=1000 first runs
# the full workload unprofiled (with the host's per-step timings).
set -o pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
F="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 2048 --num-kv-blocks 16384"
if [[ -n "${FULL_PROMPTS:-}" ]]; then   # first an unprofiled run of the full workload (host timings)
  timeout 200 python3 -m jaxllm.entrypoints.cli bench throughput --model llama-3.1-8b $F --num-prompts $FULL_PROMPTS \
    --input-len 1024 --output-len 128 --disable-tqdm --output-json "$OUT/throughput_full.json" 2>&1 | grep -v "^WARNING\|Compiling\|Loading"
fi
timeout 240 python3 -m jaxllm.entrypoints.cli bench throughput --model llama-3.1-8b $F --num-prompts ${TP_PROMPTS:-300} \
  --input-len 1024 --output-len 128 --disable-tqdm --profile /tmp/prof_tp --output-json "$OUT/throughput_prof.json" 2>&1 | grep -v "^WARNING\|Compiling\|Loading"
timeout 60 python3 tools/trace_summary.py /tmp/prof_tp --top 30 --json "$OUT/trace_tp.json"
timeout 150 python3 -m jaxllm.entrypoints.cli bench latency --model llama-3.1-8b $F --batch-size 64 --input-len 256 \
  --output-len 256 --num-iters 2 --num-iters-warmup 1 --disable-tqdm --profile /tmp/prof_b64 --output-json "$OUT/latency_b64.json" 2>&1 | grep -v "^WARNING\|Compiling\|Loading"
timeout 60 python3 tools/trace_summary.py /tmp/prof_b64 --top 30 --json "$OUT/trace_b64.json"
