#!/usr/bin/env bash
# One device call for the engine benchmarks (session 3): offline throughput with an 8192-token step
# budget on 1000 prompts, serving at concurrency 1 and 64 on two workloads (1024/128 and 256/256)
# against one `jaxllm serve`, then batch-1 latency for the 8B (a warm start: the server compiled
# the same programs) and Qwen2.5-0.5B, then a profiled Qwen2.5-0.5B decode probe.
#   bash tools/run_engine_session.sh   (carry .whl: jax-triton + the HTTP server's wheels; results in $OUT/all.tgz)
set -o pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
BASE="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --num-kv-blocks 16384"
SMALL="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 --max-num-batched-tokens 1024 --num-kv-blocks 1024"
OUT=$OUT BUDGET_S=${BUDGET_S:-440} STEPS=${STEPS:-"hw throughput_8b serve_8b latency_8b latency_small"} NUM_PROMPTS=${NUM_PROMPTS:-1000} \
  ENGINE_FLAGS="$BASE --max-num-batched-tokens 2048" THROUGHPUT_FLAGS="$BASE --max-num-batched-tokens ${TP_BUDGET:-8192}" \
  SMALL_ENGINE_FLAGS="$SMALL" SERVE_WORKLOADS=${SERVE_WORKLOADS:-"1024:128 256:256"} SERVE_CONC=${SERVE_CONC:-"1 64"} \
  SERVE_C1_PROMPTS=${SERVE_C1_PROMPTS:-8} TP_CAP=200 TP_RESERVE=200 SERVE_CAP=200 SERVE_RESERVE=90 LAT_RESERVE=45 \
  bash tools/run_bench_h100.sh
if [[ -n "${PROBE_S:-80}" && "${PROBE_S:-80}" != 0 ]]; then
  timeout ${PROBE_S:-80} python3 tools/decode_probe.py --out "$OUT/probe" --config "triton:8" --profile-first -- \
    $SMALL --batch-size 1 --input-len 1024 --output-len 128 --num-iters 3 --num-iters-warmup 1
fi
cd "$OUT" && tar czf all.tgz --exclude=all.tgz . && find . -type f ! -name all.tgz ! -name summary.md ! -name log -delete
