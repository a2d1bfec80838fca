#!/usr/bin/env bash
# `jaxllm serve` in the background, then `jaxllm bench serve` against it at fixed concurrencies.
#   MODEL_8B=llama-3.1-8b ENGINE_FLAGS="..." SERVE_CONC="1 16 64" OUT=dir bash tools/serve_bench_h100.sh
# Each level sends 16 prompts at concurrency < 4, else 8 x concurrency (128 at 16, 512 at 64) capped
# at SERVE_MAX_PROMPTS, so the higher levels reach a steady state (arrivals replace finished requests).
# Each level draws its prompts with its own seed (--seed = concurrency): levels share no prefixes.
set -u
PY=${PY:-python3}; OUT=${OUT:-./bench_out}; PORT=${PORT:-8123}
SERVE_IN=${SERVE_IN:-1024}; SERVE_OUT=${SERVE_OUT:-128}; SERVE_CONC=${SERVE_CONC:-"1 16 64"}
SERVE_MAX_PROMPTS=${SERVE_MAX_PROMPTS:-256}
mkdir -p "$OUT"
log="$OUT/serve_server.log"; t0=$SECONDS
$PY -m jaxllm.entrypoints.cli serve --model "$MODEL_8B" $ENGINE_FLAGS ${SERVE_FLAGS:-} --grpc-port -1 \
  --http-port "$PORT" >"$log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; sleep 3; kill -9 $pid 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
  sleep 2
  kill -0 $pid 2>/dev/null || { echo "server died:"; tail -30 "$log"; exit 1; }
done
echo "server up in $((SECONDS - t0))s"
rc=0
for c in $SERVE_CONC; do
  if (( c < 4 )); then n=16; else n=$(( 8 * c )); (( n > SERVE_MAX_PROMPTS )) && n=$SERVE_MAX_PROMPTS; fi
  $PY -m jaxllm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT" --model "$MODEL_8B" \
    --num-prompts $n --input-len "$SERVE_IN" --output-len "$SERVE_OUT" --request-rate inf \
    --max-concurrency $c --num-warmups 2 --vocab-size ${SERVE_VOCAB:-32000} --seed $c --disable-tqdm --output-json "$OUT/serve_llama8b_c$c.json" || rc=$?
done
tail -5 "$log"
exit $rc
