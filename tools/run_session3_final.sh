#!/usr/bin/env bash
# Session 3's last device call: the Triton knob sweep and the warp-specialized kernel's knobs
# (tools/run_kernel_session.sh, no check), then batch-1 latency with fused projections on and off
# (JAXLLM_FUSE_PROJECTIONS) for Qwen2.5-0.5B and on for Llama-3.1-8B. Results: $OUT/all.tgz.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}; mkdir -p "$OUT"
OUT=$OUT WS_CHECK_S=0 GEMV_S=0 SWEEP_S=${SWEEP_S:-200} WS_BENCH_S=${WS_BENCH_S:-80} \
  WS_BACKENDS=triton,mosaic_gpu_ws,mosaic_gpu_ws:s2,mosaic_gpu_ws:s4,mosaic_gpu_ws:bn128:s2 \
  SWEEP_CASES=llama3.1-8b:decode:1:32768,qwen2.5-7b:decode:1:32768,qwen2.5-7b:decode:32:1024,llama3.1-8b:decode:32:1024,qwen2.5-7b:prefill:1:8192,llama3.1-8b:prefill:16:512 \
  bash tools/run_kernel_session.sh 2>&1 | tee "$OUT/kernels.log" | grep -v "^{"
export PYTHONPATH=/tmp/site
BASE="--load-format dummy --dtype bfloat16 --max-model-len 2048"
for fuse in 1 0; do
  mkdir -p "$OUT/fuse$fuse"
  steps="latency_small"; budget=80; [[ $fuse == 1 ]] && { steps="latency_8b latency_small"; budget=170; }
  JAXLLM_FUSE_PROJECTIONS=$fuse OUT="$OUT/fuse$fuse" BUDGET_S=$budget STEPS="$steps" LAT_RESERVE=60 \
    ENGINE_FLAGS="$BASE --max-num-seqs 256 --max-num-batched-tokens 2048 --num-kv-blocks 16384" \
    SMALL_ENGINE_FLAGS="$BASE --max-num-seqs 8 --max-num-batched-tokens 1024 --num-kv-blocks 1024" \
    bash tools/run_bench_h100.sh 2>&1 | grep -A 14 "Latency Benchmark Result\|###.*rc="
done
cd "$OUT" && tar czf ../all.tgz . ; mv ../all.tgz . ; find . -type f ! -name all.tgz ! -name kernels.log -delete; ls
