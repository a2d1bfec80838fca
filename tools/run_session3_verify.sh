#!/usr/bin/env bash
# Session 3's check of the new kernel defaults: Triton (decode 4 stages, split only under one
# wave, prefill 4 warps) on every decode/prefill/mixed case, then the warp-specialized Mosaic
# kernel's check and prefill timings with its new default (128-key tiles, 2 stages).
set -o pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
timeout 200 python3 tools/bench_attention.py --out "$OUT/triton" --backends triton --no-baselines --budget-s 185 2>&1 | grep -v "^{" | tail -45
timeout 150 python3 tools/gpu_kernel_check.py --backends mosaic_gpu_ws --json "$OUT/ws_check.json" 2>&1 | grep "checks failed\|FAIL\|rror" | tail -8
timeout 70 python3 tools/bench_attention.py --out "$OUT/ws" --backends mosaic_gpu_ws --kinds prefill --no-baselines --budget-s 60 2>&1 | grep -v "^{" | tail -8
