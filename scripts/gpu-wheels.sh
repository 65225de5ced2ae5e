#!/usr/bin/env bash
# Download, on a machine with network, the wheels scripts/gpu-check.sh installs on a GPU
# machine without one: scripts/gpu-requirements.txt and their dependencies, as Python
# 3.12 manylinux x86_64 wheels, into .gpu-wheels/ (git-ignored; carry it with the run).
# torch is left out on purpose: the GPU machine has its CUDA build, and pip must not
# replace it with a CPU one.
#
# The whole set is about 82 MB, scipy (34 MB, for scikit-learn and dp-accounting) and numpy
# (16 MB) the largest; a run that may carry less (64 MiB on this project's lent machines)
# drops what the GPU image already has: FEDMQ_GPU_HAS="numpy scipy" removes those wheels
# (pip on the GPU machine then takes them from its system site-packages).
#
#   [FEDMQ_GPU_HAS="numpy scipy"] scripts/gpu-wheels.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.gpu-wheels}
PIP=${PIP:-$ROOT/.venv/bin/pip}
[[ -x $PIP ]] || PIP="python3 -m pip"
mkdir -p "$DIR"
if grep -qiE '^(torch|nvidia-)' "$ROOT/scripts/gpu-requirements.txt"; then
  echo "gpu-requirements.txt must not name torch or CUDA libraries" >&2
  exit 1
fi
# shellcheck disable=SC2086  # $PIP may be "python3 -m pip"
$PIP download --dest "$DIR" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  -r "$ROOT/scripts/gpu-requirements.txt"
if ls "$DIR" | grep -qiE '^(torch|nvidia_)'; then
  echo "a dependency pulled in torch or CUDA wheels: remove them from $DIR" >&2
  exit 1
fi
for name in ${FEDMQ_GPU_HAS:-}; do
  rm -f "$DIR/${name//-/_}"-[0-9]*.whl
done
du -sh "$DIR"
