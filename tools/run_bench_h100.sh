#!/usr/bin/env bash
# One-call GPU benchmark of jaxllm against the transformers peer (fits a 9-minute device call).
#
#   bash tools/run_bench_h100.sh            # from the repository root; results in $OUT (or ./bench_out)
#
# Steps (each under its own time limit, drawn from one overall budget; a failed or timed-out step
# is recorded and the script goes on):
#   1. hw probe: device-copy bandwidth (1 GiB bf16, read+write) and 8192^3 bf16 matmul rate
#   2. jaxllm bench latency   llama-3.1-8b   batch 1, LAT_IN in / LAT_OUT out  (TTFT, TPOT, ITL, MBU)
#   3. jaxllm bench throughput llama-3.1-8b  NUM_PROMPTS x TP_IN / TP_OUT, with the roofline
#   4. HF peer throughput on the same preset and prompts (generate_batch, else static generate)
#   5. HF peer batch-1 TPOT (static cache, eager unless HF_COMPILE=1)
#   6. jaxllm bench latency   qwen2.5-0.5b
# and writes $OUT/*.json, $OUT/summary.md (python -m jaxllm.bench.report) and $OUT/log.
#
# Needs no network and no install: PYTHONPATH=. (the device image has jax+CUDA, flax, transformers,
# torch, tqdm). Every knob is an environment variable (defaults below); NUM_PROMPTS defaults to
# 1000 (vllm bench throughput's default) and is cut to fit when the budget left is short: the
# number actually run is printed and stored in throughput_llama8b.json.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export JAXLLM_CACHE_DIR=${JAXLLM_CACHE_DIR:-/tmp/jaxllm_cache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
PY=${PY:-python3}

BUDGET_S=${BUDGET_S:-530}             # whole script; the device call allows 540 s
MODEL_8B=${MODEL_8B:-llama-3.1-8b}
MODEL_SMALL=${MODEL_SMALL:-qwen2.5-0.5b}
LAT_IN=${LAT_IN:-1024}; LAT_OUT=${LAT_OUT:-128}; LAT_ITERS=${LAT_ITERS:-5}; LAT_WARMUP=${LAT_WARMUP:-2}
TP_IN=${TP_IN:-1024}; TP_OUT=${TP_OUT:-128}
# vllm bench throughput's default is 1000 prompts; on one H100 in 9 minutes, with both engines'
# start-up (jaxllm compiles ~15 programs for the 8B; transformers' continuous batching ran
# 64 x 1024/128 in 30 s on 2026-11-24), 200 is what fits. Cut further below if time is short.
NUM_PROMPTS=${NUM_PROMPTS:-200}
HF_COMPILE=${HF_COMPILE:-0}
# Shared by the 8B latency and throughput runs so the second engine start hits the persistent
# compilation cache (identical shapes: the KV size is fixed rather than derived from free memory,
# and leaves XLA's GEMM autotuner room; 16384 blocks x 16 tokens hold 227 sequences of 1152).
ENGINE_FLAGS=${ENGINE_FLAGS:---load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 2048 --num-kv-blocks 16384}
SMALL_ENGINE_FLAGS=${SMALL_ENGINE_FLAGS:---load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 --max-num-batched-tokens 1024 --num-kv-blocks 1024}
# Seconds per prompt (jaxllm + HF peer, 1024/128 on an H100) and fixed start-up costs, to size NUM_PROMPTS.
SEC_PER_PROMPT_X100=${SEC_PER_PROMPT_X100:-75}; TP_FIXED_S=${TP_FIXED_S:-90}; TAIL_S=${TAIL_S:-140}

exec > >(tee "$OUT/log") 2>&1
START=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - START))); }
STATUS=()
# step NAME CAP_S CMD...: run CMD under min(CAP_S, budget left - reserve) seconds.
step() {
  local name=$1 cap=$2; shift 2
  local lim=$(( $(left) - ${RESERVE:-5} ))
  (( lim > cap )) && lim=$cap
  if (( lim < 15 )); then echo "### $name: SKIPPED (budget spent)"; STATUS+=("$name: skipped"); return; fi
  echo "### $name (limit ${lim}s, $(left)s of budget left) :: $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$lim" "$@"
  local rc=$?
  echo "### $name: rc=$rc in $((SECONDS - t0))s"
  STATUS+=("$name: rc=$rc, $((SECONDS - t0))s")
}

echo "### device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
$PY -c 'import jax, jaxlib, transformers, torch; print("### jax", jax.__version__, "jaxlib", jaxlib.__version__, "transformers", transformers.__version__, "torch", torch.__version__, jax.devices())'

step hw 60 $PY -m jaxllm.bench.hw --output-json "$OUT/hw.json"

RESERVE=$((BUDGET_S * 55 / 100)) step latency_8b 220 $PY -m jaxllm.entrypoints.cli bench latency --model "$MODEL_8B" $ENGINE_FLAGS \
  --batch-size 1 --input-len "$LAT_IN" --output-len "$LAT_OUT" --num-iters "$LAT_ITERS" \
  --num-iters-warmup "$LAT_WARMUP" --disable-tqdm --output-json "$OUT/latency_llama8b.json"

# Throughput: fewer prompts when the budget is short; the HF peer then runs the same number.
AVAIL=$(( $(left) - TAIL_S - TP_FIXED_S ))
FIT=$(( AVAIL * 100 / SEC_PER_PROMPT_X100 ))
if (( FIT < NUM_PROMPTS )); then
  NUM_PROMPTS=$FIT; (( NUM_PROMPTS < 32 )) && NUM_PROMPTS=32
  echo "### budget: throughput cut to NUM_PROMPTS=$NUM_PROMPTS"
fi
echo "### throughput workload: $NUM_PROMPTS prompts x $TP_IN in / $TP_OUT out"
RESERVE=$((TAIL_S + TP_FIXED_S / 3 + NUM_PROMPTS * SEC_PER_PROMPT_X100 / 300)) step throughput_8b 300 $PY -m jaxllm.entrypoints.cli bench throughput --model "$MODEL_8B" $ENGINE_FLAGS \
  --num-prompts "$NUM_PROMPTS" --input-len "$TP_IN" --output-len "$TP_OUT" --disable-tqdm \
  --output-json "$OUT/throughput_llama8b.json"

RESERVE=$((TAIL_S - 15)) step hf_throughput_8b 240 $PY tools/bench_hf_peer.py throughput --model "$MODEL_8B" \
  --num-prompts "$NUM_PROMPTS" --input-len "$TP_IN" --output-len "$TP_OUT" --output-json "$OUT/hf_throughput_llama8b.json"

HF_FLAGS=""; [[ "$HF_COMPILE" == 1 ]] || HF_FLAGS="--no-compile"
RESERVE=$((TAIL_S - 50)) step hf_latency_8b 60 $PY tools/bench_hf_peer.py latency --model "$MODEL_8B" --batch-size 1 \
  --input-len "$LAT_IN" --output-len "$LAT_OUT" --num-iters 3 --num-iters-warmup 1 $HF_FLAGS \
  --output-json "$OUT/hf_latency_llama8b.json"

step latency_small 150 $PY -m jaxllm.entrypoints.cli bench latency --model "$MODEL_SMALL" $SMALL_ENGINE_FLAGS \
  --batch-size 1 --input-len "$LAT_IN" --output-len "$LAT_OUT" --num-iters "$LAT_ITERS" \
  --num-iters-warmup "$LAT_WARMUP" --disable-tqdm --output-json "$OUT/latency_qwen05b.json"

$PY -m jaxllm.bench.report "$OUT" --out "$OUT/summary.md" >/dev/null
{ echo "## Steps"; echo; for s in "${STATUS[@]}"; do echo "- $s"; done; echo; echo "total $((SECONDS - START))s"; } \
  >> "$OUT/summary.md"
cat "$OUT/summary.md"
