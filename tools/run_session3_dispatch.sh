#!/usr/bin/env bash
# Session 3: is the 8B step's dispatch blocking on device-side control flow? `bench throughput`
# (300 x 1024/128, 2048 budget) under XLA command-buffer settings, each printing the host's
# ms per step (schedule, pack, dispatch, wait, postprocess); then the full 1000-prompt run under
# the setting whose 300-prompt run was fastest.
set -o pipefail
cd "$(dirname "$0")/.."
source tools/device_env.sh
F="--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 2048 --num-kv-blocks 16384"
VARIANTS=("default:" "cb_off:--xla_gpu_enable_command_buffer=" \
          "cb_ctrl:--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL")
for v in "${VARIANTS[@]}"; do
  name=${v%%:*}; flags=${v#*:}
  echo "### $name XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" timeout 130 python3 -m jaxllm.entrypoints.cli bench throughput --model llama-3.1-8b $F --num-prompts 300 \
    --input-len 1024 --output-len 128 --disable-tqdm --output-json "$OUT/tp300_$name.json" 2>&1 | grep "Host ms\|Output token\|Fraction\|rror" 
done
best=$(python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for f in glob.glob(os.path.join(sys.argv[1], "tp300_*.json")):
    rows.append((json.load(open(f))["output_tokens_per_second"], os.path.basename(f)[6:-5]))
print(max(rows)[1] if rows else "default")
PY
)
for v in "${VARIANTS[@]}"; do [[ ${v%%:*} == "$best" ]] && flags=${v#*:}; done
echo "### full run with $best XLA_FLAGS='$flags'"
XLA_FLAGS="$flags" timeout 150 python3 -m jaxllm.entrypoints.cli bench throughput --model llama-3.1-8b $F --num-prompts 1000 \
  --input-len 1024 --output-len 128 --disable-tqdm --output-json "$OUT/tp1000_$best.json" 2>&1 | grep -v "^WARNING\|Compiling\|Loading"
