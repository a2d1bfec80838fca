#!/usr/bin/env bash
# `jaxllm serve` in the background, then `jaxllm bench serve` against it at fixed concurrencies.
#   MODEL_8B=llama-3.1-8b ENGINE_FLAGS="..." SERVE_CONC="1 16 64" OUT=dir bash tools/serve_bench_h100.sh
# Each level sends 16 prompts at concurrency < 4, else 8 x concurrency (128 at 16, 512 at 64) capped
# at SERVE_MAX_PROMPTS, so the higher levels reach a steady state (arrivals replace finished requests).
# Each level draws its prompts with its own seed (--seed = concurrency): levels share no prefixes.
# SERVE_WORKLOADS="1024:128 256:256" runs several in:out workloads against the same server (files
# serve_llama8b_<in>x<out>_c<c>.json; one workload keeps the plain serve_llama8b_c<c>.json names).
set -u
PY=${PY:-python3}; OUT=${OUT:-./bench_out}; PORT=${PORT:-8123}
SERVE_IN=${SERVE_IN:-1024}; SERVE_OUT=${SERVE_OUT:-128}; SERVE_CONC=${SERVE_CONC:-"1 16 64"}
SERVE_MAX_PROMPTS=${SERVE_MAX_PROMPTS:-256}; SERVE_C1_PROMPTS=${SERVE_C1_PROMPTS:-16}
SERVE_WORKLOADS=${SERVE_WORKLOADS:-"$SERVE_IN:$SERVE_OUT"}
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
nw=$(wc -w <<<"$SERVE_WORKLOADS")
for w in $SERVE_WORKLOADS; do
  in=${w%%:*}; out=${w##*:}; tag=""; (( nw > 1 )) && tag="${in}x${out}_"
  for c in $SERVE_CONC; do
    if (( c < 4 )); then n=$SERVE_C1_PROMPTS; else n=$(( 8 * c )); (( n > SERVE_MAX_PROMPTS )) && n=$SERVE_MAX_PROMPTS; fi
    echo "### serve workload ${in}/${out}, concurrency $c, $n prompts"
    $PY -m jaxllm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT" --model "$MODEL_8B" \
      --num-prompts $n --input-len "$in" --output-len "$out" --request-rate inf \
      --max-concurrency $c --num-warmups 2 --vocab-size ${SERVE_VOCAB:-32000} --seed $(( c + in )) --disable-tqdm \
      --output-json "$OUT/serve_llama8b_${tag}c$c.json" || rc=$?
  done
done
tail -5 "$log"
exit $rc
