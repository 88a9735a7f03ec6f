#!/bin/bash
# On the GPU machine, after the vLLM wheels are in /tmp/parts (see ../shared/gpu/README.md)
# and the gateway's in .whl/gw: the gateway's replica routing policies measured on two vLLM
# servers sharing the one GPU (bench/bench_routing.py). Two vLLM servers with prefix caching
# and a KV cache of BLOCKS blocks of 16 tokens each (room for about 10 of the 16 tenants'
# 2k-token prefixes next to the requests running), a random-weight Llama of about 1B
# parameters (HID x LAYERS, bench/gpu/mkmodel.py), and three one-process gateways in front
# of both servers, one per policy (least_outstanding :9000, prefix :9001, session :9002).
# Cores: the vLLM servers 0-4 and 5-9, the gateways 10-11 (one of them busy at a time), the
# load 12-15.
# GW_APP: the folder whose `app` package the gateways run (default: this checkout; e.g.
# `git archive HEAD app | tar x -C .gwhead` to measure a commit while app/ is being edited).
# ROUNDS (3), DURATION_S (12), CONCURRENCY (64), BLOCKS (1536); the bench starts no round
# that would end after BUDGET_S (540) seconds from the script's start. Writes under $OUT.
# STUB=1: a dry run on any machine, no GPU: bench_routing.py's stand-in for vLLM instead,
# no wheels, no pinning, PY (default python3) with the gateway's dependencies.
set -x
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$D/../.." && pwd)
OUT=${OUT:-/tmp/routing}
mkdir -p "$OUT"
GW_APP=$(cd "${GW_APP:-$ROOT}" && pwd)
PY=${PY:-python3}
MODEL=/tmp/llama_1b
BLOCKS=${BLOCKS:-1536}
GWPATH=/tmp/gwsite:/tmp/site  # the gateway's wheels, then vLLM's; the load needs aiohttp
[ -n "$STUB" ] && GWPATH=
pin() {  # CPUS COMMAND...: run COMMAND on those cores (in place of this shell)
  if [ -n "$STUB" ]; then shift; exec "$@"; fi
  exec taskset -c "$@"
}
if [ -z "$STUB" ]; then
  # The model is built (the image's torch and transformers) while the wheels install.
  (HID=${HID:-2048} LAYERS=${LAYERS:-16} pin 10-15 python3 "$D/mkmodel.py" $MODEL > /tmp/mkmodel.log 2>&1) &
  MK=$!
  mkdir -p /tmp/lean && cat /tmp/parts/lean.tar.part* | tar x -C /tmp/lean || exit 2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/lean/*.whl 2>&1 | grep -v WARNING | tail -5
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gwsite "$ROOT"/.whl/gw/*.whl 2>&1 | grep -v WARNING | tail -5
  wait $MK || { cat /tmp/mkmodel.log; exit 3; }
  tail -1 /tmp/mkmodel.log
  echo "model built at +$(( $(date +%s)-T0 ))s"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
# VLLM_SERVER_DEV_MODE: POST /reset_prefix_cache, which the bench calls before each segment.
# Compile caches of their own, so that the two servers do not write the same files at once.
for i in 0 1; do
  if [ -n "$STUB" ]; then
    (pin - $PY "$ROOT/bench/bench_routing.py" stub --port 800$i --blocks "$BLOCKS" > "$OUT/vllm$i.log" 2>&1) &
  else
    (PYTHONPATH=/tmp/site VLLM_SERVER_DEV_MODE=1 VLLM_CACHE_ROOT=/tmp/vllm_cache$i TORCHINDUCTOR_CACHE_DIR=/tmp/inductor$i TRITON_CACHE_DIR=/tmp/triton$i pin $((i * 5))-$((i * 5 + 4)) \
      python3 -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name m --port 800$i \
      --gpu-memory-utilization 0.4 --max-model-len 4096 --enable-prefix-caching --block-size 16 \
      --num-gpu-blocks-override "$BLOCKS" --max-num-seqs 128 --disable-uvicorn-access-log > "$OUT/vllm$i.log" 2>&1) &
  fi
  eval VLLM$i=$!
done
GWS=""
GATEWAY_ARGS=""
i=0
for policy in least_outstanding prefix session; do
  (cd "$GW_APP" && MODEL_GATEWAY_VARIANTS='[{"name": "m", "backend": "openai", "upstream": {"replicas": ["http://127.0.0.1:8000", "http://127.0.0.1:8001"], "max_concurrency_per_replica": 1024, "routing": {"policy": "'$policy'"}}}]' \
    MODEL_GATEWAY_CACHE__ENABLED=false MODEL_GATEWAY_LOG_LEVEL=warning MODEL_GATEWAY_WORKERS=1 MODEL_GATEWAY_DRAIN_S=0 \
    PYTHONPATH=$GWPATH pin 10-11 $PY -m app serve --auth off --host 127.0.0.1 --port 900$i >> "$OUT/gateways.log" 2>&1) &
  GWS="$GWS $!"
  GATEWAY_ARGS="$GATEWAY_ARGS --gateway $policy=http://127.0.0.1:900$i"
  i=$((i + 1))
done
for t in $(seq 1 300); do
  $PY -c "import urllib.request as u; [u.urlopen(f'http://127.0.0.1:{p}/health', timeout=2) for p in (8000, 8001)]" 2>/dev/null && break
  kill -0 $VLLM0 && kill -0 $VLLM1 || { tail -40 "$OUT/vllm0.log" "$OUT/vllm1.log"; exit 4; }
  sleep 1
done
echo "vLLM up at +$(( $(date +%s)-T0 ))s"
# Each gateway sees both servers healthy (its health check runs every 2 s).
for t in $(seq 1 30); do
  n=0
  for p in 9000 9001 9002; do
    n=$((n + $(curl -s localhost:$p/metrics | grep -c '^model_gateway_upstream_replica_healthy{.*} 1.0')))
  done
  [ $n -eq 6 ] && break
  sleep 0.5
done
echo "gateways see $n of 6 replicas healthy at +$(( $(date +%s)-T0 ))s"
curl -s localhost:9001/v1/completions -H 'content-type: application/json' -d '{"model": "m", "prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0}'; echo
curl -s -X POST localhost:8000/reset_prefix_cache; echo
{ lscpu | grep -E "Vendor|Model name|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  PYTHONPATH=/tmp/site python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>/dev/null | tail -1
  git -C "$ROOT" log -1 --format='checkout %h %s' 2>/dev/null; echo "GW_APP=$GW_APP"; } 2>&1
grep -E "num_gpu_blocks|GPU KV cache size|Maximum concurrency|max_num_batched_tokens|backend" "$OUT/vllm0.log" | head -8
# shellcheck disable=SC2086
(PYTHONPATH=$GWPATH pin 12-15 $PY "$ROOT/bench/bench_routing.py" run --model m $GATEWAY_ARGS \
  --vllm http://127.0.0.1:8000 --vllm http://127.0.0.1:8001 --rounds "${ROUNDS:-3}" \
  --duration-s "${DURATION_S:-12}" --warmup-s 3 --concurrency "${CONCURRENCY:-64}" --processes 2 \
  --deadline $((T0 + ${BUDGET_S:-540})) --jsonl "$OUT/routing.jsonl" --markdown "$OUT/routing.md")
echo "bench done at +$(( $(date +%s)-T0 ))s"
{ for p in 9000 9001 9002; do curl -s localhost:$p/metrics | grep -E "^model_gateway_(route_decisions_total|upstream_replica_healthy|requests_total)"; done
  for p in 8000 8001; do echo "# vLLM :$p"; curl -s localhost:$p/metrics | grep -E "^vllm:(prefix_cache|prompt_tokens|num_preemptions|request_success|generation_tokens|kv_cache_usage)"; done
} > "$OUT/metrics.txt" 2>&1
grep route_decisions "$OUT/metrics.txt"
grep -ciE "error|traceback" "$OUT/gateways.log"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
echo "all done at +$(( $(date +%s)-T0 ))s"
# shellcheck disable=SC2086
kill $GWS $VLLM0 $VLLM1
sleep 2
