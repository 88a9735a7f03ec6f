#!/bin/bash
# On the GPU machine (its CPU only), right after vllm_gateway.sh on the same warm machine
# (/tmp/site and /tmp/gwsite installed, /tmp/llama_small built), with the CTranslate2 cp312
# wheel carried in .whl/ct2: the gateway-overhead bench with the worker, the gateway and the
# client each on cores of their own, as in a deployment. BASELINE=DIR (a tree with another
# version's app/, e.g. `git archive REF app | tar x -C DIR`, carried) adds that gateway to the
# rotation. Writes under $OUT.
set -x
D=$(cd "$(dirname "$0")" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ctsite .whl/ct2/*.whl 2>&1 | grep -v WARNING | tail -5
export PYTHONPATH=/tmp/ctsite:/tmp/gwsite:/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -d /tmp/llama_small ] || python3 $D/mkmodel.py /tmp/llama_small 2>&1 | tail -1
python3 -m app convert /tmp/llama_small /tmp/ct2_cpu --quantization int8 2>&1 | tail -2
lscpu | grep -E "Model name|^CPU\(s\)|Thread"
python3 bench/bench_gateway_overhead.py --model-path /tmp/ct2_cpu --rounds ${ROUNDS:-3} \
  --worker-cpus 0-3 --gateway-cpus 4,5 --client-cpus 6,7 ${BASELINE:+--baseline-tree $BASELINE} \
  2>&1 | tee $OUT/overhead_cpu.md
