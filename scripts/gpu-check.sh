#!/usr/bin/env bash
# Everything in fedmq that needs a GPU, in one command, for a lent GPU machine that has
# Python 3.12 with a CUDA PyTorch, no network, no RabbitMQ and no Postgres:
#
#   1. the project's other dependencies, from wheels carried along (scripts/gpu-wheels.sh
#      downloads them beforehand into .gpu-wheels/), into a venv that sees the system's
#      torch (--system-site-packages);
#   2. `pytest -m gpu` (the CUDA folder and the CUDA edge engine against the CPU);
#   3. the CUDA aggregation benchmark (benchmarks/aggregate.py --quick: host-to-device
#      bandwidth, T_total / max(T_copy, T_compute), GPU busy);
#   4. the paper's six split scenarios with the edge on the GPU over the in-process bus
#      (benchmarks/split_scenarios.py).
#
# Every figure and log goes to $OUT (default ./gpu-check-out): env.txt, pytest-gpu.xml,
# aggregate.{md,json}, split_scenarios.{md,json}, steps.tsv (step, exit status,
# seconds). Each step has its own time budget and the whole run a deadline of 450 s, so
# it ends within 8 minutes whatever hangs; a failed step does not stop the next.
#
#   scripts/gpu-check.sh             # on the GPU machine; exit 1 if any step failed
#   scripts/gpu-check.sh --dry-run   # the same steps on the CPU with tiny sizes (CI)
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-check-out}
WHEELS=${FEDMQ_WHEELS:-$ROOT/.gpu-wheels}
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${FEDMQ_GPU_CHECK_DEADLINE_S:-450} ))
mkdir -p "$OUT"
: >"$OUT/steps.tsv"
cd "$ROOT"
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1 MPLBACKEND=Agg

FAILED=0
# step NAME BUDGET_S COMMAND...: run COMMAND with at most BUDGET_S seconds (less if the
# deadline is nearer), its output to $OUT/NAME.log, its status to steps.tsv.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    printf '%s\tskipped (deadline)\t0\n' "$name" >>"$OUT/steps.tsv"
    FAILED=1
    return
  fi
  local t0 rc
  t0=$(date +%s)
  echo "== $name (at most ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
  (( rc != 0 )) && FAILED=1
  return 0
}

# 1. Dependencies: a venv over the system's Python (its CUDA torch included), the
# missing packages from the carried wheels. pip leaves what is already there alone.
if (( ! DRY )) && [[ -d $WHEELS ]]; then
  VENV=${TMPDIR:-/tmp}/fedmq-gpu-venv
  step venv 30 "$PY" -m venv --system-site-packages "$VENV"
  step deps 90 "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" \
    -r "$ROOT/scripts/gpu-requirements.txt"
  PY=$VENV/bin/python
fi

step env 30 "$PY" -c '
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
'
cp "$OUT/env.log" "$OUT/env.txt" 2>/dev/null

if (( DRY )); then
  step pytest-gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    --junitxml="$OUT/pytest-gpu.xml" tests/unit/test_pipeline_gpu.py tests/unit/test_split_gpu.py
  step aggregate 90 "$PY" benchmarks/aggregate.py --tiny --json "$OUT/aggregate.json"
  step split_scenarios 150 "$PY" benchmarks/split_scenarios.py --tiny \
    --json "$OUT/split_scenarios.json"
else
  # No CUDA is a failed check, not a silent CPU run.
  step cuda 30 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  step pytest-gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    --junitxml="$OUT/pytest-gpu.xml" tests/unit/test_pipeline_gpu.py tests/unit/test_split_gpu.py
  step aggregate 120 "$PY" benchmarks/aggregate.py --quick --json "$OUT/aggregate.json"
  step split_scenarios 210 "$PY" benchmarks/split_scenarios.py --repeats 2 \
    --json "$OUT/split_scenarios.json"
fi
# The benchmarks print their markdown tables: keep them beside the JSON.
for b in aggregate split_scenarios; do
  [[ -f $OUT/$b.log ]] && grep -v '^USDT' "$OUT/$b.log" >"$OUT/$b.md"
done

echo "== steps (name, exit status, seconds)"
cat "$OUT/steps.tsv"
exit "$FAILED"
