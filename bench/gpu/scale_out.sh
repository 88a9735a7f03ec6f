#!/bin/bash
# On the GPU machine (its 16 CPU cores only; the GPU is unused), with cp312 wheels of the
# gateway's dependencies carried in .whl/gw (pinned to the versions of .venv, opentelemetry-api
# included: FastAPI 0.165 imports it): requests/s through 1, 2 and 4 gateway processes in
# front of an instant upstream, interleaved rounds (bench/bench_scale_out.py). Cores: the
# upstream 0-3 (one process each), the gateway 4-7 (N processes get the first N), the clients
# 8-15 (one process each). ROUNDS (default 5). Writes under $OUT.
set -x
T0=$(date +%s)
OUT=${OUT:-/tmp/scale_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gwsite .whl/gw/*.whl 2>&1 | grep -v WARNING | tail -5
export PYTHONPATH=/tmp/gwsite:$PWD PYTHONUNBUFFERED=1
python3 -c "import sys, app.main, aiohttp, fastapi, uvicorn, uvloop; print('gateway imports ok', sys.version.split()[0], fastapi.__version__, uvicorn.__version__, uvloop.__version__)"
{ lscpu; lscpu -e; nproc; uname -r; } > "$OUT/machine.txt" 2>&1
grep -E "Vendor|Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|Hypervisor" "$OUT/machine.txt"
python3 bench/bench_scale_out.py run --workers 1,2,4 --rounds "${ROUNDS:-5}" \
  --upstream-cpus 0-3 --gateway-cpus 4-7 --client-cpus 8-15 --connections 256 \
  --warmup-s 2 --duration-s 6 --jsonl "$OUT/scale_out.jsonl" 2>&1 \
  | grep -v "auth is off" | tee "$OUT/scale_out.md"
echo "all done at +$(( $(date +%s)-T0 ))s"
