#!/usr/bin/env bash
# One device call for the attention kernels (session 3): the warp-specialized Mosaic GPU kernel's
# check (and, if it passes, its prefill timings beside Triton's), the Triton knob sweep on the
# cases that missed (small decode grids, prefill), and the GEMV layout probe for the small model.
#   bash tools/run_kernel_session.sh    (carry .whl with the jax-triton wheel; results in $OUT)
set -o pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
T0=$SECONDS
ws_ok=1
if (( ${WS_CHECK_S:-150} > 0 )); then
echo "### ws check"
timeout ${WS_CHECK_S:-150} python3 tools/gpu_kernel_check.py --backends mosaic_gpu_ws --json "$OUT/ws_check.json" 2>&1 \
  | grep -v "^WARNING" | tail -40 | tee "$OUT/ws_check.log"
ws_ok=0; grep -q "^0 of [1-9][0-9]* checks failed" "$OUT/ws_check.log" && ws_ok=1
fi
echo "### ws_ok=$ws_ok after $((SECONDS - T0))s"
echo "### triton sweep"
timeout ${SWEEP_S:-260} python3 tools/bench_attention.py --out "$OUT/sweep" --backends triton --sweep-only \
  --budget-s $(( ${SWEEP_S:-260} - 20 )) --sweep-cases "${SWEEP_CASES:-llama3.1-8b:decode:1:32768,qwen2.5-7b:decode:1:32768,qwen2.5-7b:decode:32:1024,llama3.1-8b:decode:32:1024,llama3.1-8b:prefill:1:8192,llama3.1-8b:prefill:16:512}" \
  2>&1 | grep -v "^{" | tail -60
echo "### sweep done after $((SECONDS - T0))s"
if (( ws_ok )); then
  echo "### ws prefill"
  timeout ${WS_BENCH_S:-110} python3 tools/bench_attention.py --out "$OUT/ws" --backends ${WS_BACKENDS:-triton,mosaic_gpu_ws} \
    --kinds prefill --no-baselines --budget-s $(( ${WS_BENCH_S:-110} - 15 )) 2>&1 | grep -v "^{" | tail -20
fi
if (( ${GEMV_S:-80} > 0 )); then
  echo "### gemv probe after $((SECONDS - T0))s"
  timeout ${GEMV_S:-80} python3 tools/gemv_probe.py --out "$OUT" 2>&1 | tail -20
fi
echo "### total $((SECONDS - T0))s"
