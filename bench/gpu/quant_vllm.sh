#!/bin/bash
# On the GPU machine: the default model's vLLM-servable quantized variants, made with our own
# `quantize` command on the GPU and measured with our own `eval`, all four served at once on
# the one GPU; and the raw HTTP bodies vLLM sends for the OpenAI features the gateway passes
# through (tools, structured output, logprobs, n, echo, usage in streams, errors), for tests.
#
# What it measures: accuracy, agreement with bf16, perplexity, tokens/s (1 and 32 streams),
# TTFT, size on disk and memory of bf16 (the HF checkpoint served with --dtype bfloat16),
# fp8-dynamic, w4a16-gptq and w8a8-int8 (eval.md / eval.json / eval.png under $OUT/eval);
# how long the GGUF conversion, each quantize stage and each server's start took (run.log).
#
# What it needs on the machine, staged by earlier calls while it stays warm (each copies a
# carried folder into /tmp):
#   /tmp/parts/lean.tar.part0..3  vLLM 0.26.0's lean wheels (../shared/gpu/prepare_wheels.sh
#                                 writes them to .whl/p0..p3; ../shared/gpu/README.md);
#   /tmp/q/*.whl                  .whl/q: what `quantize` and `eval` need beyond the image and
#                                 vLLM's set: llmcompressor 0.14.0.1, compressed-tensors 0.19.0
#                                 (vLLM keeps its own 0.17.0: installed apart, in /tmp/qsite),
#                                 datasets, multiprocess, fsspec, gguf (transformers' GGUF
#                                 reader), rapidfuzz and redis (imported by app.convert.evaluate);
#   /tmp/gguf/gguf.part0          .whl/gguf0: the first half of models/.cache/
#                                 SmolLM2-135M-Instruct.Q4_1.gguf (`split -b 49181216`);
# and, carried by this call, .whl/gguf1/gguf.part1 (the second half). INSTALLED=1 when an
# earlier call already installed the wheels into /tmp/site and /tmp/qsite.
# APP: the folder whose `app` package runs (default: this checkout; e.g. `git archive HEAD
# app | tar x -C .whl/apphead` to run a commit while app/ is being edited).
#
# Cores: the vLLM servers 0-2 (bf16), 3-5 (fp8-dynamic), 6-8 (w4a16-gptq), 9-11 (w8a8-int8);
# quantize, the fixtures and eval 12-15. A quantized server starts as soon as its folder is
# whole, while quantize goes on with the next scheme. Each server takes --gpu-memory-utilization
# 0.2 and a fixed 4 GiB KV cache (--kv-cache-memory-bytes): with several processes starting on
# one GPU, vLLM's memory profiling would count the others' allocations as its own.
# BUDGET_S (540): no eval starts after BUDGET_S - 70 s; eval is cut at BUDGET_S - 12 s.
# FIXTURES_ONLY=URL: only the fixtures, against that server (model FIXTURE_MODEL, default
# bf16), into $OUT/vllm_fixtures.json: runs anywhere with httpx.
T0=$(date +%s)
D=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$D/../.." && pwd)
OUT=$(mkdir -p "${OUT:-/tmp/quant_vllm}" && cd "${OUT:-/tmp/quant_vllm}" && pwd)
APP=$(cd "${APP:-$ROOT}" && pwd)
BUDGET_S=${BUDGET_S:-540}
W=/tmp/qv        # the GGUF, the HF checkpoint, the variants, the logs
L=$W/logs
mkdir -p "$OUT" "$L"
el() { echo $(($(date +%s) - T0)); }
say() { echo "[+$(el)s] $*"; }

# The fixtures: each request as sent, vLLM's status, reply headers and body (JSON: parsed, and
# the exact text) or, streaming, the raw SSE text with every `data:` line.
cat > $W/fixtures.py <<'PY'
import json, sys, time
import httpx

base, model, out = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


def chat(messages=ASK, **kw):
    return {"model": model, "messages": messages, "max_tokens": 64, "temperature": 0, **kw}


def completion(**kw):
    return {"model": model, "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0, **kw}


def round_trip(content):
    return [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": content, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 18, \"sky\": \"clear\"}"}]


C, P = "/v1/chat/completions", "/v1/completions"
# name, endpoint, body, ways ("json": stream off, "sse": stream on)
CASES = [
    ("chat_tool_named", C, chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), ("json", "sse")),
    ("chat_tool_auto", C, chat(tools=[WEATHER], tool_choice="auto"), ("json", "sse")),
    ("chat_json_schema", C, chat([{"role": "user", "content": "Invent a person; answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON, "strict": True}}), ("json", "sse")),
    ("chat_json_object", C, chat([{"role": "user", "content": "Invent a person; answer in JSON."}],
        response_format={"type": "json_object"}), ("json", "sse")),
    ("chat_logprobs", C, chat(max_tokens=8, logprobs=True, top_logprobs=5), ("json", "sse")),
    ("chat_n3_seed", C, chat(max_tokens=16, n=3, temperature=1, seed=1), ("json", "sse")),
    ("completion_logprobs", P, completion(max_tokens=8, logprobs=5), ("json", "sse")),
    # n > 1 needs sampling: vLLM 0.26 refuses n=2 at temperature 0 (the first run, 2026-12-03).
    ("completion_echo_n2", P, completion(max_tokens=8, echo=True, n=2, temperature=1, seed=1),
        ("json", "sse")),
    ("error_n2_greedy", P, completion(max_tokens=8, echo=True, n=2), ("json",)),
    ("chat_tool_round_trip", C, chat(round_trip(""), tools=[WEATHER]), ("json", "sse")),
    ("chat_tool_round_trip_null_content", C, chat(round_trip(None), tools=[WEATHER]), ("json",)),
    ("chat_stream_usage", C, chat(max_tokens=16, stream_options={"include_usage": True}), ("sse",)),
    ("error_n0", C, chat(n=0), ("json", "sse")),
    ("error_max_tokens_negative", C, chat(max_tokens=-1), ("json",)),
    ("error_stream_options_without_stream", C,
        chat(max_tokens=8, stream_options={"include_usage": True}), ("json",)),
    ("error_unknown_model", C, {**chat(max_tokens=8), "model": "no-such-model"}, ("json",)),
]

records = []
with httpx.Client(timeout=120) as client:
    for name, endpoint in (("models", "/v1/models"), ("version", "/version")):
        r = client.get(base + endpoint)
        records.append({"name": name, "endpoint": "GET " + endpoint, "request": None,
                        "status": r.status_code, "headers": dict(r.headers), "body_text": r.text})
    for name, endpoint, body, ways in CASES:
        for way in ways:
            request = dict(body, stream=True) if way == "sse" else body
            record = {"name": name + ("_stream" if way == "sse" else ""), "endpoint": "POST " + endpoint,
                      "request": request}
            started = time.monotonic()
            try:
                with client.stream("POST", base + endpoint, json=request) as r:
                    text = r.read().decode()
                record.update(status=r.status_code, headers=dict(r.headers))
                if way == "sse" and r.status_code == 200:
                    record["sse"] = text
                else:
                    try:
                        record["body"] = json.loads(text)
                    except ValueError:
                        pass
                    record["body_text"] = text
            except httpx.HTTPError as exc:
                record.update(status=None, error=f"{type(exc).__name__}: {exc}")
            record["seconds"] = round(time.monotonic() - started, 3)
            records.append(record)
            print(record["name"], record.get("status"), record["seconds"], "s", flush=True)
with open(out, "w") as f:
    json.dump(records, f, indent=1)
print(f"{len(records)} fixtures in {out}")
PY
if [ -n "$FIXTURES_ONLY" ]; then
  python3 $W/fixtures.py "$FIXTURES_ONLY" "${FIXTURE_MODEL:-bf16}" "$OUT/vllm_fixtures.json"
  exit
fi

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  lscpu | grep -E "Vendor ID|Model name|^CPU\(s\)"; python3 -V; uname -r
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git -C "$ROOT" log -1 --format='checkout %h %s' 2>/dev/null; echo "APP=$APP"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. Wheels: vLLM's set into /tmp/site; ours (llmcompressor, ...) into /tmp/qsite, ahead of it
# on the path of quantize and eval only.
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
if [ -z "$INSTALLED" ]; then
  mkdir -p /tmp/lean && cat /tmp/parts/lean.tar.part* | tar x -C /tmp/lean || exit 2
  $PIP /tmp/site /tmp/lean/*.whl 2>&1 | grep -v WARNING | tail -5
  $PIP /tmp/qsite /tmp/q/*.whl 2>&1 | grep -v WARNING | tail -5
  say "wheels installed"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
QPATH=/tmp/qsite:/tmp/site:$APP

# 2. The HF checkpoint (float32) from the GGUF, by app.convert.prepare.gguf_to_hf.
mkdir -p $W/gguf
cat /tmp/gguf/gguf.part0 "$ROOT/.whl/gguf1/gguf.part1" > $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
say "gguf_to_hf: start"
cd /tmp && PYTHONPATH=$QPATH taskset -c 12-15 python3 -c "
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
from app.convert.prepare import gguf_to_hf
gguf_to_hf(Path(sys.argv[1]), Path(sys.argv[2]))" $W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf $W/hf > $L/gguf_to_hf.log 2>&1
RC=$?; tail -3 $L/gguf_to_hf.log
[ $RC -eq 0 ] && [ -f $W/hf/config.json ] || { say "gguf_to_hf failed"; cp $L/gguf_to_hf.log "$OUT/"; exit 4; }
say "gguf_to_hf: done ($(du -sh $W/hf | cut -f1))"

# 4. Servers, one per variant, each on its cores, its port, its compile caches.
declare -A PORT=([bf16]=8000 [fp8-dynamic]=8001 [w4a16-gptq]=8002 [w8a8-int8]=8003)
declare -A CPUS=([bf16]=0-2 [fp8-dynamic]=3-5 [w4a16-gptq]=6-8 [w8a8-int8]=9-11)
declare -A PID STARTED UP DIR
start() {  # NAME MODEL_DIR EXTRA_ARGS...
  local name=$1 model=$2; shift 2
  local cmd="python3 -m vllm.entrypoints.openai.api_server --model $model --served-model-name $name --host 127.0.0.1 --port ${PORT[$name]} --gpu-memory-utilization 0.2 --kv-cache-memory-bytes 4294967296 --max-model-len 2048 --max-num-seqs 128 --disable-uvicorn-access-log $*"
  say "start $name: taskset -c ${CPUS[$name]} $cmd"
  # shellcheck disable=SC2086
  PYTHONPATH=/tmp/site VLLM_CACHE_ROOT=/tmp/vc-$name TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name TRITON_CACHE_DIR=/tmp/tri-$name \
    taskset -c "${CPUS[$name]}" $cmd > "$L/vllm-$name.log" 2>&1 &
  PID[$name]=$!; STARTED[$name]=$(el); DIR[$name]=$model
}
healthy() { curl -sf -m 2 "http://127.0.0.1:${PORT[$1]}/health" > /dev/null; }
start bf16 $W/hf --dtype bfloat16 --enable-auto-tool-choice --tool-call-parser hermes

# 3. The quantized checkpoints, on the GPU, by our own command.
SCHEMES="fp8-dynamic w4a16-gptq w8a8-int8"
QCMD="python3 -m app quantize $W/q --src $W/hf --ctranslate2 '' --vllm fp8-dynamic,w4a16-gptq,w8a8-int8"
say "quantize: $QCMD"
(cd /tmp && PYTHONPATH=$QPATH exec taskset -c 12-15 python3 -m app quantize $W/q --src $W/hf --ctranslate2 '' \
  --vllm fp8-dynamic,w4a16-gptq,w8a8-int8 > $L/quantize.log 2>&1) &
QPID=$!
FIX=""
while :; do
  for s in $SCHEMES; do
    if [ -z "${PID[$s]}" ] && [ -f $W/q/vllm-$s/config.json ]; then
      say "quantize: vllm-$s written"
      start $s $W/q/vllm-$s
    fi
  done
  for n in "${!PID[@]}"; do
    if [ -z "${UP[$n]}" ] && healthy $n; then UP[$n]=$(el); say "$n up (started at +${STARTED[$n]}s)"; fi
  done
  # The fixtures, against bf16 as soon as it answers (cores 12-15, beside quantize).
  if [ -z "$FIX" ] && [ -n "${UP[bf16]}" ]; then
    say "fixtures: start"
    (cd /tmp && PYTHONPATH=/tmp/site timeout 150 taskset -c 12-15 python3 $W/fixtures.py http://127.0.0.1:8000 bf16 "$OUT/vllm_fixtures.json" > $L/fixtures.log 2>&1; echo "[+$(el)s] fixtures: exit $?" >> $L/fixtures.log) &
    FIX=$!
  fi
  if ! kill -0 $QPID 2>/dev/null && [ -z "$QDONE" ]; then
    wait $QPID; QRC=$?; QDONE=$(el)
    say "quantize: exit $QRC"; grep -E "failed|Error|error:" $L/quantize.log | grep -v METRIC | tail -5
    continue  # once more through the loop: a folder written just before the exit
  fi
  if [ -n "$QDONE" ]; then
    all=1; for n in "${!PID[@]}"; do [ -z "${UP[$n]}" ] && kill -0 ${PID[$n]} 2>/dev/null && all=0; done
    [ $all = 1 ] && break
  fi
  if [ "$(el)" -ge $((BUDGET_S - 160)) ]; then
    say "deadline: quantize and server starts cut"; kill $QPID 2>/dev/null; break
  fi
  sleep 1
done
for n in "${!PID[@]}"; do
  [ -z "${UP[$n]}" ] && { say "$n never answered /health:"; tail -25 "$L/vllm-$n.log"; }
done
grep -hE "Loading weights took|Model loading took|torch.compile took|Graph capturing finished|init engine|quantization=|Using .* backend|Marlin|kernel" $L/vllm-*.log | head -40
[ -n "$FIX" ] && { wait $FIX; tail -3 $L/fixtures.log; }

# 5. Eval: the variants that came up, bf16 the reference.
TARGETS=""
for n in bf16 $SCHEMES; do
  [ -n "${UP[$n]}" ] && TARGETS="$TARGETS $n=http://127.0.0.1:${PORT[$n]},model=$n,path=${DIR[$n]}"
done
left=$((BUDGET_S - 12 - $(el)))
SPEED=""; [ $left -lt 90 ] && SPEED=--no-speed
if [ -n "${UP[bf16]}" ] && [ $left -gt 30 ]; then
  say "eval: python3 -m app eval$TARGETS --reference bf16 --out \$OUT/eval $SPEED (timeout ${left}s)"
  # shellcheck disable=SC2086
  (cd /tmp && PYTHONPATH=$QPATH timeout $left taskset -c 12-15 python3 -m app eval $TARGETS --reference bf16 --out "$OUT/eval" $SPEED) 2>&1 | tee $L/eval.log | grep -v "^wrote"
  say "eval: done"
else
  say "eval skipped (bf16 up: ${UP[bf16]:-no}; ${left}s left)"
fi

# 7. Logs and facts.
{ echo "timings (s from start): quantize exit ${QDONE:-none} rc ${QRC:-none}"
  for n in bf16 $SCHEMES; do echo "$n: started ${STARTED[$n]:-never} up ${UP[$n]:-never} port ${PORT[$n]}"; done
  du -sb $W/hf $W/q/* 2>/dev/null; nvidia-smi --query-gpu=memory.used,memory.total --format=csv
  PYTHONPATH=/tmp/site python3 -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null | tail -1
  PYTHONPATH=$QPATH python3 -c "import llmcompressor, compressed_tensors, datasets, pyarrow; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tail -1
} | tee $L/summary.txt
for n in "${!PID[@]}"; do curl -s -m 2 "http://127.0.0.1:${PORT[$n]}/metrics" > "$L/metrics-$n.txt"; done
for s in $SCHEMES; do [ -f $W/q/vllm-$s/config.json ] && cp $W/q/vllm-$s/config.json $L/config-$s.json; done
tar czf "$OUT/logs.tar.gz" -C $W logs
say "all done"
kill "${PID[@]}" 2>/dev/null
sleep 1
