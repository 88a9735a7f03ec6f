#!/bin/bash
# On the GPU machine: the default model's CTranslate2 variants for CUDA, made with our own
# `quantize` command and measured with our own `eval`, each served by our own worker on CUDA,
# all six at once on the one GPU.
#
# What it measures: accuracy, agreement with float32, perplexity (CTranslate2's score_batch
# on the model folder, on the CPU: our worker answers no prompt_logprobs), tokens/s (1 and
# 32 streams), TTFT, size on disk, peak RSS and GPU memory (our worker's /metrics, where NVML
# answers) of ct2-float32, -float16, -bfloat16, -int8_float16, -int8_bfloat16 and -int8
# (eval.md / eval.json / eval.png under $OUT/eval); how long the GGUF conversion, each
# quantize stage and each worker's start took (run.log, logs.tar.gz).
#
# What it needs on the machine, staged by earlier calls while it stays warm:
#   /tmp/gguf/gguf.part0  .whl/gguf0: the first half of models/.cache/
#                         SmolLM2-135M-Instruct.Q4_1.gguf (`split -b 49181216`); staged by
#                         `mkdir -p /tmp/gguf && cp .whl/gguf0/gguf.part0 /tmp/gguf/`;
#   /tmp/site             the wheels of .whl/ct2gw installed (`STAGE=install bash
#                         bench/gpu/ct2_quant_cuda.sh`, carrying .whl/ct2gw; it checks the
#                         imports and CTranslate2's CUDA types, then stops): CTranslate2 4.8.5
#                         (cp312, manylinux_2_28) and what the gateway needs beyond the image,
#                         pinned as in .venv: fastapi 0.165.0, starlette 1.10.0, uvicorn 0.55.0,
#                         httptools 0.9.0, pydantic 2.14.4, pydantic-core 2.50.5,
#                         pydantic-settings 2.16.3, python-dotenv 1.2.4, typing-inspection 0.4.5,
#                         annotated-types 0.8.0, typing-extensions 4.16.0 (pydantic's minimum),
#                         opentelemetry-api 1.45.2 (fastapi's), redis 8.1.0, hiredis 3.5.0,
#                         rapidfuzz 3.14.6, gguf 0.19.0 (transformers' GGUF reader);
# and, carried by this call, .whl/gguf1/gguf.part1 (the second half). The main call:
#   INSTALLED=1 bash bench/gpu/ct2_quant_cuda.sh 2>&1 | tee $OUT/run.log
# APP: the folder whose `app` package runs (default: this checkout).
# TYPES: the CTranslate2 types (default all six; float32 first: the reference).
# DEVICE (cuda): where the workers run; DEVICE=cpu TYPES=float32,int8 runs it on a CPU
# machine (the local check of this script; no taskset under 16 cores).
#
# CTranslate2 4.8 loads libcublas.so.12; the image has cuBLAS 13 only: a symlink in /tmp/shim
# (../shared/gpu/README.md, "CTranslate2 4.8.5 on CUDA"). Unsupported across CUDA majors,
# fine for measuring here.
#
# Cores: worker i (i = 0..5, in TYPES order) on cores 2i..2i+1; quantize and eval on 12-15
# (gguf_to_hf, alone, on all). A worker starts as soon as its variant's folder is whole,
# while quantize goes on with the next type; each waits for /ready READY_S (90 s).
# BUDGET_S (250): quantize and worker starts are cut at BUDGET_S - 110 s; eval runs without
# its speed part when fewer than 110 s are left, and is cut at BUDGET_S - 8 s.
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$D/../.." && pwd)
OUT=$(mkdir -p "${OUT:-/tmp/ct2_quant_cuda}" && cd "${OUT:-/tmp/ct2_quant_cuda}" && pwd)
APP=$(cd "${APP:-$ROOT}" && pwd)
BUDGET_S=${BUDGET_S:-250}
READY_S=${READY_S:-90}
DEVICE=${DEVICE:-cuda}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-$ROOT/.whl/ct2gw}
IFS=, read -r -a TYPES <<< "${TYPES:-float32,float16,bfloat16,int8_float16,int8_bfloat16,int8}"
W=/tmp/cw        # the GGUF, the HF checkpoint, the logs
Q=/tmp/cq        # the variants, one folder each (quantize's output)
L=$W/logs
mkdir -p "$OUT" "$L"
el() { echo $(($(date +%s) - T0)); }
say() { echo "[+$(el)s] $*"; }
# $(pin CORES) CMD...: taskset where the machine has the 16 cores this layout assumes.
NCPU=$(nproc)
pin() { [ "$NCPU" -ge 16 ] && echo "taskset -c $1"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$SITE:$APP
mkdir -p /tmp/shim && ln -sf /usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublas.so.13 /tmp/shim/libcublas.so.12
export LD_LIBRARY_PATH=/tmp/shim:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# 1. Wheels into $SITE (STAGE=install: that, and a check, alone).
if [ -z "$INSTALLED" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl 2>&1 | grep -v WARNING | tail -5
  say "wheels installed: $(ls "$WHEELS" | wc -l) from $WHEELS"
fi
CHECK="import ctranslate2, fastapi, uvicorn, pydantic, pydantic_settings, redis, rapidfuzz, gguf, transformers, torch
import app.main, app.convert.quantize, app.convert.evaluate
print('ctranslate2', ctranslate2.__version__, 'cuda devices', ctranslate2.get_cuda_device_count(),
      'cuda types', sorted(ctranslate2.get_supported_compute_types('cuda')) if ctranslate2.get_cuda_device_count() else '-',
      'cpu types', sorted(ctranslate2.get_supported_compute_types('cpu')))
print('fastapi', fastapi.__version__, 'pydantic', pydantic.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$STAGE" = install ]; then  # no torch here: a quick look that the wheels and the shim work
  (cd /tmp && python3 -c "import ctranslate2, fastapi, pydantic, app.main, app.convert.evaluate
print('ctranslate2', ctranslate2.__version__, 'cuda devices', ctranslate2.get_cuda_device_count(),
      sorted(ctranslate2.get_supported_compute_types('cuda')), 'fastapi', fastapi.__version__)")
  say "stage install: exit $?"; exit
fi

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  lscpu | grep -E "Vendor ID|Model name|^CPU\(s\)"; python3 -V; uname -r
  (cd /tmp && python3 -c "$CHECK")
  git -C "$ROOT" log -1 --format='checkout %h %s' 2>/dev/null; echo "APP=$APP DEVICE=$DEVICE TYPES=${TYPES[*]}"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 2. The HF checkpoint (float32) from the GGUF, by app.convert.prepare.gguf_to_hf.
mkdir -p $W/gguf
cat /tmp/gguf/gguf.part0 "${GGUF1:-$ROOT/.whl/gguf1/gguf.part1}" > $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
say "gguf_to_hf: start"
(cd /tmp && python3 -c "
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
from app.convert.prepare import gguf_to_hf
gguf_to_hf(Path(sys.argv[1]), Path(sys.argv[2]))" $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf $W/hf) > $L/gguf_to_hf.log 2>&1
RC=$?; tail -3 $L/gguf_to_hf.log
[ $RC -eq 0 ] && [ -f $W/hf/config.json ] || { say "gguf_to_hf failed"; cp $L/gguf_to_hf.log "$OUT/"; exit 4; }
say "gguf_to_hf: done ($(du -sh $W/hf | cut -f1))"

# 3. Workers, one per variant, each on its cores and port, started as its folder appears.
declare -A PORT CPUS PID STARTED UP DEAD
i=0
for t in "${TYPES[@]}"; do PORT[$t]=$((9101 + i)); CPUS[$t]=$((2 * i))-$((2 * i + 1)); i=$((i + 1)); done
export MODEL_GATEWAY_CACHE__ENABLED=false MODEL_GATEWAY_HOST=127.0.0.1 MODEL_GATEWAY_LOG_LEVEL=info
start() {  # TYPE
  local t=$1
  local variants="[{\"name\": \"$t\", \"model_path\": \"$Q/ct2-$t\", \"device\": \"$DEVICE\"}]"
  say "start $t: MODEL_GATEWAY_VARIANTS='$variants' $(pin "${CPUS[$t]}") python3 -m app serve --auth off --port ${PORT[$t]}"
  (cd /tmp && MODEL_GATEWAY_VARIANTS=$variants exec $(pin "${CPUS[$t]}") python3 -m app serve --auth off \
    --port "${PORT[$t]}") > "$L/worker-$t.log" 2>&1 &
  PID[$t]=$!; STARTED[$t]=$(el)
}
ready() { curl -sf -m 2 "http://127.0.0.1:${PORT[$1]}/ready" > /dev/null; }

# 4. The variants, by our own command (the converter runs on the CPU; CUDA types are loaded
# back on the GPU to check them).
QARGS=(quantize $Q --src $W/hf --ctranslate2 "$(IFS=,; echo "${TYPES[*]}")" --vllm '')
say "quantize: python3 -m app ${QARGS[*]}"
rm -rf $Q
(cd /tmp && exec $(pin 12-15) python3 -m app "${QARGS[@]}" > $L/quantize.log 2>&1) &
QPID=$!
while :; do
  for t in "${TYPES[@]}"; do
    if [ -z "${PID[$t]}" ] && [ -d $Q/ct2-$t ]; then say "quantize: ct2-$t written"; start $t; fi
  done
  for t in "${!PID[@]}"; do
    [ -n "${UP[$t]}${DEAD[$t]}" ] && continue
    if ready $t; then UP[$t]=$(el); say "$t ready (started at +${STARTED[$t]}s)"
    elif ! kill -0 ${PID[$t]} 2>/dev/null; then DEAD[$t]=$(el); say "$t: worker exited"; tail -15 "$L/worker-$t.log"
    elif [ $(($(el) - STARTED[$t])) -ge $READY_S ]; then DEAD[$t]=$(el); say "$t: no /ready in ${READY_S}s"; tail -15 "$L/worker-$t.log"
    fi
  done
  if [ -z "$QDONE" ] && ! kill -0 $QPID 2>/dev/null; then
    wait $QPID; QRC=$?; QDONE=$(el)
    say "quantize: exit $QRC"; grep -E "failed|Error|error|done in|cannot" $L/quantize.log | tail -20
    continue  # once more through the loop: a folder written just before the exit
  fi
  if [ -n "$QDONE" ]; then
    all=1; for t in "${!PID[@]}"; do [ -z "${UP[$t]}${DEAD[$t]}" ] && all=0; done
    [ $all = 1 ] && break
  fi
  if [ "$(el)" -ge $((BUDGET_S - 110)) ]; then
    say "deadline: quantize and worker starts cut"; kill $QPID 2>/dev/null; break
  fi
  sleep 0.5
done

# 5. Eval: the variants that came up, float32 (the first type) the reference.
TARGETS=()
for t in "${TYPES[@]}"; do
  [ -n "${UP[$t]}" ] && TARGETS+=("$t=http://127.0.0.1:${PORT[$t]},path=$Q/ct2-$t")
done
REF=${TYPES[0]}
left=$((BUDGET_S - 8 - $(el)))
SPEED=(); [ $left -lt 110 ] && SPEED=(--no-speed)
if [ -n "${UP[$REF]}" ] && [ $left -gt 30 ]; then
  say "eval: python3 -m app eval ${TARGETS[*]} --reference $REF --out \$OUT/eval ${SPEED[*]} (timeout ${left}s)"
  (cd /tmp && timeout $left $(pin 12-15) python3 -m app eval "${TARGETS[@]}" --reference $REF \
    --out "$OUT/eval" "${SPEED[@]}") 2>&1 | tee $L/eval.log | grep -v "^wrote"
  say "eval: exit ${PIPESTATUS[0]}"
else
  say "eval skipped ($REF ready: ${UP[$REF]:-no}; ${left}s left)"
fi

# 6. Logs and facts.
{ echo "timings (s from start): quantize exit ${QDONE:-none} rc ${QRC:-none}"
  grep -E "done in|written to|failed" $L/quantize.log | sed 's/^/  /'
  for t in "${TYPES[@]}"; do
    echo "$t: port ${PORT[$t]} cores ${CPUS[$t]} started ${STARTED[$t]:-never} ready ${UP[$t]:-never} gave up ${DEAD[$t]:-no}"
  done
  du -sb $W/hf $Q/* 2>/dev/null
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv
} 2>&1 | tee $L/summary.txt
for t in "${!PID[@]}"; do
  curl -s -m 2 "http://127.0.0.1:${PORT[$t]}/metrics" > "$L/metrics-$t.txt"
  { echo "== worker $t (tail)"; tail -25 "$L/worker-$t.log"; } >> "$OUT/workers.txt"
done
tar czf "$OUT/logs.tar.gz" -C $W logs
say "all done"
kill "${PID[@]}" 2>/dev/null
sleep 1
