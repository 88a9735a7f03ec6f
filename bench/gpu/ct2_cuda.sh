#!/bin/bash
# On the GPU machine, with the vLLM wheel set in /tmp/parts (for fastapi & co.) and the
# CTranslate2 cp312 wheel in .whl/ct2: our worker serving a CTranslate2 model on CUDA.
set -x
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/lean && cat /tmp/parts/lean.tar.part* | tar x -C /tmp/lean || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/lean/*.whl .whl/extra/*.whl .whl/ct2/*.whl 2>&1 | grep -v WARNING | tail -5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# CTranslate2 4.8 loads libcublas.so.12; the image has cuBLAS 13 (see shared/gpu/README.md).
mkdir -p /tmp/shim && ln -sf /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13 /tmp/shim/libcublas.so.12
export LD_LIBRARY_PATH=/tmp/shim:/usr/local/cuda-13.0/targets/x86_64-linux/lib:$LD_LIBRARY_PATH
python3 $D/mkmodel.py /tmp/llama_small 2>&1 | tail -1
python3 -m app convert /tmp/llama_small /tmp/ct2_small --quantization float16 2>&1 | tail -3
export MODEL_GATEWAY_CACHE__ENABLED=false MODEL_GATEWAY_LOG_LEVEL=warning
for layout in 128 256; do
  MODEL_GATEWAY_VARIANTS="[{\"name\": \"tiny\", \"model_path\": \"/tmp/ct2_small\", \"device\": \"cuda\", \"compute_type\": \"float16\", \"batching\": {\"max_batch_size\": $layout, \"max_queue_size\": 1024}}]" \
    python3 -m app serve --port 9100 > $OUT/ct2_worker_$layout.log 2>&1 &
  W=$!
  for i in $(seq 1 120); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/ready', timeout=2)" 2>/dev/null && break
    kill -0 $W || { tail -30 $OUT/ct2_worker_$layout.log; exit 3; }
    sleep 1
  done
  curl -s localhost:9100/v1/completions -H 'content-type: application/json' -d '{"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0}'; echo
  python3 $D/load.py http://127.0.0.1:9100 tiny 32 64 > /dev/null  # warm-up
  for round in 1 2 3; do
    python3 $D/load.py http://127.0.0.1:9100 tiny 1 8 --stream --processes 1 | sed "s/^/batch$layout /" | tee -a $OUT/ct2.jsonl
    python3 $D/load.py http://127.0.0.1:9100 tiny 64 128 | sed "s/^/batch$layout /" | tee -a $OUT/ct2.jsonl
    python3 $D/load.py http://127.0.0.1:9100 tiny 256 512 | sed "s/^/batch$layout /" | tee -a $OUT/ct2.jsonl
  done
  curl -s localhost:9100/metrics | grep -E "^model_gateway_(batch_size_(sum|count)|gpu_)" | head -12
  kill $W; wait $W 2>/dev/null
done
echo "all done at +$(( $(date +%s)-T0 ))s"
