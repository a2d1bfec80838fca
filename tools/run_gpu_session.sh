#!/usr/bin/env bash
# One device call: the engine check on the GPU (picks the attention backend), then the benchmarks.
#   bash tools/run_gpu_session.sh     (carry .whl with the jax-triton wheel; results in $OUT)
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}" TF_CPP_MIN_LOG_LEVEL=2 JAXLLM_CACHE_DIR=/tmp/jaxllm_cache
timeout 110 python3 tools/gpu_engine_check.py --out "$OUT" 2>&1 | grep -v "Loading\|Writing" | tee "$OUT/engine_check.log" | tail -25
BACKEND=$(cat "$OUT/backend.txt" 2>/dev/null || echo reference)
export ENGINE_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 2048 --num-kv-blocks 16384 --attention-backend $BACKEND"
export SMALL_ENGINE_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 --max-num-batched-tokens 1024 --num-kv-blocks 1024 --attention-backend $BACKEND"
OUT="$OUT" BUDGET_S=${BUDGET_S:-330} STEPS=${STEPS:-"hw latency_8b throughput_8b latency_small hf_throughput_8b"} bash tools/run_bench_h100.sh
