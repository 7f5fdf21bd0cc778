#!/bin/bash
# The GPU check: everything issue 27 asks to measure, on whatever GPU is at hand, in one call
# of at most 8 minutes. Each step runs in its own process under its own time limit and
# appends its rows to $OUT/check.jsonl as it measures them (benchmarks/gpu_check.py), so a
# step that runs out of time keeps what it measured and the next step still runs.
# Adapted from the H200 run of 2026-12-04 (its run.sh: wheels carried in .whl/, dmon).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh               # on a GPU machine, repository root
#   OUT=/tmp/check bash benchmarks/gpu_check.sh --cpu-smoke     # here: the tiny model on CPU
#
# Wheels the machine lacks (diffusers, transformers, pydantic, ...; never Ray: the engine
# and its gpu tests must run without it) go in .whl/ at the repository root. Limits add up
# to 460 s: engine 110, pixels 70, compile-cold 120, compile-warm 60, tests 80, card 20,
# with 20 s left for installs and start-up.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
SMOKE=${1:-}
CACHE=$(mktemp -d /tmp/gpu-check.XXXX)  # models and compile caches: empty, so the cold compile is cold
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
card() {  # the card's power and clocks, now
  command -v nvidia-smi >/dev/null || { echo "no nvidia-smi" >> "$OUT/card.txt"; return; }
  timeout 10 nvidia-smi --query-gpu=timestamp,name,driver_version,power.draw,power.limit,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,memory.used,memory.total \
    --format=csv >> "$OUT/card.txt" 2>&1
}
card
if command -v nvidia-smi >/dev/null; then nvidia-smi dmon -s pucm -d 2 > "$OUT/dmon.txt" 2>&1 & fi
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS-t0))s" | tee -a "$OUT/steps.txt"; }
check() { step "$1" "$2" $PY benchmarks/gpu_check.py "$1" --out "$OUT" --cache "$CACHE" $SMOKE; }
scale() { [ -n "$SMOKE" ] && echo $(( $1 * 4 )) || echo "$1"; }  # CPU compiles take minutes
check engine "$(scale 110)"
check pixels "$(scale 70)"
check compile-cold "$(scale 120)"
check compile-warm "$(scale 60)"
# The engine's gpu-marked tests, with Ray made unimportable: they must not need it.
step tests 80 $PY -c "import sys; sys.modules['ray'] = None; import pytest; sys.exit(pytest.main(['tests/test_gpu.py', '-q', '-rs', '-p', 'no:cacheprovider']))"
card
kill %1 2>/dev/null; true
