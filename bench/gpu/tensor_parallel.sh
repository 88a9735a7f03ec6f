#!/bin/bash
# On a two-GPU machine (nvidia-h200-x2): one random-weight Llama of about 1.1B parameters served
# by vLLM split over both GPUs (--tensor-parallel-size 2), our gateway in front (4 processes);
# then the same model on one GPU (--tensor-parallel-size 1) for comparison. In each phase the
# same loads go straight to vLLM and through the gateway, interleaved (A B A B): throughput at
# 64 and 256 concurrent, JSON and streaming, and TTFT of streams. Writes under $OUT: load.jsonl
# (one line per load, with "tp" and "target"), vllm_tp*.log, gateway_tp*.log, machine.txt.
#
# Needs, as vllm_gateway.sh: vLLM's wheels in /tmp/parts (../shared/gpu/README.md: four staging
# calls) and the gateway's in .whl/gw (carried by this call). TP_SIZES ("2 1"): the phases;
# a dry run on one GPU: TP_SIZES=1. ROUNDS (3). HID (2048) and LAYERS (18): the model's size.
# Not yet run on two GPUs: that kind was withheld when this was written (issue 20).
set -x
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/lean && cat /tmp/parts/lean.tar.part* | tar x -C /tmp/lean || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/lean/*.whl 2>&1 | grep -v WARNING | tail -5
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gwsite .whl/gw/*.whl 2>&1 | grep -v WARNING | tail -5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
# NVLink multicast stays off (KINDS.md: it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GWPATH=/tmp/gwsite:/tmp/site:$PWD
{ date -u; nvidia-smi -L; lscpu | grep -E "Vendor ID|Model name"; } > $OUT/machine.txt
HID=${HID:-2048} LAYERS=${LAYERS:-18} python3 $D/mkmodel.py /tmp/llama_1b 2>&1 | tail -1
python3 -c "import json; c = json.load(open('/tmp/llama_1b/config.json')); print('model', c['hidden_size'], c['num_hidden_layers'])"
LOAD="env PYTHONPATH=$GWPATH taskset -c 10-$(( $(nproc) - 1 )) python3 $D/load.py"
export MODEL_GATEWAY_VARIANTS='[{"name": "llama", "backend": "openai", "upstream": {"replicas": ["http://127.0.0.1:8000"], "max_concurrency_per_replica": 1024}}]' \
  MODEL_GATEWAY_CACHE__ENABLED=false MODEL_GATEWAY_LOG_LEVEL=warning MODEL_GATEWAY_AUTH=off
for tp in ${TP_SIZES:-2 1}; do
  GPUS=$(seq -s, 0 $(( tp - 1 )))
  CUDA_VISIBLE_DEVICES=$GPUS taskset -c 0-5 python3 -m vllm.entrypoints.openai.api_server --model /tmp/llama_1b \
    --served-model-name llama --tensor-parallel-size $tp --max-model-len 2048 --port 8000 \
    --gpu-memory-utilization 0.85 > $OUT/vllm_tp$tp.log 2>&1 &
  VLLM=$!
  PYTHONPATH=$GWPATH MODEL_GATEWAY_WORKERS=4 taskset -c 6-9 python3 -m app serve --host 127.0.0.1 --port 9000 > $OUT/gateway_tp$tp.log 2>&1 &
  GW=$!
  for i in $(seq 1 400); do
    python3 -c "import urllib.request as u; [u.urlopen(x, timeout=2) for x in ('http://127.0.0.1:8000/health', 'http://127.0.0.1:9000/ready')]" 2>/dev/null && break
    kill -0 $VLLM || { tail -50 $OUT/vllm_tp$tp.log; exit 3; }
    sleep 1
  done
  echo "tp $tp up at +$(( $(date +%s) - T0 ))s"
  for url in http://127.0.0.1:8000 http://127.0.0.1:9000; do $LOAD $url llama 64 128 > /dev/null; done  # warm-up
  for round in $(seq 1 ${ROUNDS:-3}); do
    for load in "64 128" "256 512" "64 128 --stream" "256 512 --stream" "1 16 --stream --processes 1"; do
      for url in http://127.0.0.1:8000 http://127.0.0.1:9000; do
        target=$([ $url = http://127.0.0.1:8000 ] && echo vllm || echo gateway)
        $LOAD $url llama $load | sed "s/^{/{\"tp\": $tp, \"target\": \"$target\", \"round\": $round, /" | tee -a $OUT/load.jsonl
      done
    done
  done
  nvidia-smi --query-gpu=index,memory.used --format=csv >> $OUT/machine.txt
  kill $GW $VLLM; wait $GW $VLLM 2>/dev/null
done
echo "all done at +$(( $(date +%s) - T0 ))s"
