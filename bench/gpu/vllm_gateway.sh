#!/bin/bash
# On the GPU machine, after the vLLM wheels are in /tmp/parts (see ../shared/gpu/README.md)
# and ours in .whl/gw (cp312 wheels of the gateway's dependencies that vLLM's set lacks,
# installed apart so neither changes the other's versions): vLLM's server, our gateway in
# front of it, the same load straight to vLLM and through the gateway, interleaved. Writes
# under $OUT. vLLM, the gateway and the load clients run on cores of their own (6, 4 and the
# rest of 16), so that neither the gateway nor the clients take CPU from vLLM's API server.
# ROUNDS (default 5); STREAM_ONLY=1 skips the JSON loads; SINGLE=1 adds a one-process gateway.
set -x
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/lean && cat /tmp/parts/lean.tar.part* | tar x -C /tmp/lean || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/lean/*.whl 2>&1 | grep -v WARNING | tail -5
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gwsite .whl/gw/*.whl 2>&1 | grep -v WARNING | tail -5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
GWPATH=/tmp/gwsite:/tmp/site:$PWD
PYTHONPATH=$GWPATH python3 -c "import app.main, aiohttp, fastapi, httpx; print('gateway imports ok', aiohttp.__version__, fastapi.__version__)"
python3 $D/mkmodel.py /tmp/llama_small 2>&1 | tail -1
taskset -c 0-5 python3 -m vllm.entrypoints.openai.api_server --model /tmp/llama_small --served-model-name tiny --max-model-len 1024 --port 8000 --gpu-memory-utilization 0.85 > $OUT/vllm.log 2>&1 &
VLLM=$!
export MODEL_GATEWAY_VARIANTS='[{"name": "tiny", "backend": "openai", "upstream": {"replicas": ["http://127.0.0.1:8000"], "max_concurrency_per_replica": 1024}}]' \
  MODEL_GATEWAY_CACHE__ENABLED=false MODEL_GATEWAY_LOG_LEVEL=warning
PYTHONPATH=$GWPATH MODEL_GATEWAY_WORKERS=${GATEWAY_WORKERS:-4} taskset -c 6-9 python3 -m app serve --port 9000 > $OUT/gateway.log 2>&1 &
GW=$!
URLS="http://127.0.0.1:8000 http://127.0.0.1:9000"
if [ -n "$SINGLE" ]; then
  PYTHONPATH=$GWPATH MODEL_GATEWAY_WORKERS=1 taskset -c 6-9 python3 -m app serve --port 9001 > $OUT/gateway1.log 2>&1 &
  GW1=$!
  URLS="$URLS http://127.0.0.1:9001"
fi
LOAD="env PYTHONPATH=$GWPATH taskset -c 10-15 python3 $D/load.py"  # aiohttp is in /tmp/gwsite
for i in $(seq 1 300); do
  python3 -c "import sys, urllib.request as u; [u.urlopen(x + p, timeout=2) for x, p in zip(sys.argv[1:], ['/health', '/ready', '/ready'])]" $URLS 2>/dev/null && break
  kill -0 $VLLM || { tail -50 $OUT/vllm.log; exit 3; }
  sleep 1
done
echo "both up at +$(( $(date +%s)-T0 ))s"
curl -s localhost:9000/v1/completions -H 'content-type: application/json' -d '{"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0}'; echo
curl -sN localhost:9000/v1/completions -H 'content-type: application/json' -d '{"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 3, "temperature": 0, "stream": true}'; echo
curl -s localhost:9000/generate -H 'content-type: application/json' -d '{"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 4}}'; echo
for url in $URLS; do $LOAD $url tiny 64 128 > /dev/null; done  # warm-up
# Each load straight to vLLM, then through the gateway, before the next: A B A B ...
for round in $(seq 1 ${ROUNDS:-5}); do
  for conc in $([ -n "$STREAM_ONLY" ] || echo 64 256); do
    for url in $URLS; do $LOAD $url tiny $conc $((conc * 2)) | tee -a $OUT/load.jsonl; done
  done
  for load in "1 32 --stream --processes 1" "64 128 --stream" "256 512 --stream"; do
    for url in $URLS; do $LOAD $url tiny $load | tee -a $OUT/load.jsonl; done
  done
done
curl -s localhost:9000/metrics | grep -E "^model_gateway_(requests_total|time_to_first_token_seconds_count|upstream)" | head -20
curl -s localhost:8000/metrics > $OUT/vllm_metrics.txt
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
echo "all done at +$(( $(date +%s)-T0 ))s"
kill $GW $GW1 $VLLM
wait
