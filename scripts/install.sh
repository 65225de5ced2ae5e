#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs fedmq into it with the pins of constraints.txt.
# Usage: scripts/install.sh [extra]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for py in python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv >/dev/null && {
      echo python3.11; return 0; }
  fi
  echo "fedmq needs Python 3.11 (python3.11 on PATH)" >&2; return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
# The test tools come with the optional extras whose tests CI runs (Flower clients).
[ "${1:-}" = test ] && spec=".[test,flower]"
# Stamp: skip pip when nothing that decides the install changed (keeps re-runs fast).
stamp=".venv/.fedmq-install-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${1:-base}"
if [ ! -f "$stamp" ]; then
  log=$(mktemp)
  if ! .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e "$spec" \
      >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; exit 1
  fi
  # This machine's pip config names index folders that may not exist; that noise is dropped.
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  touch "$stamp"
fi
# The WASM device kernels: devices/wasm/kernels.wasm is built from kernels.c when clang and
# wasm-ld are here (scripts/ensure-wasm-toolchain.sh installs them); otherwise the committed
# module is used as it is.
if command -v clang >/dev/null 2>&1 && command -v wasm-ld >/dev/null 2>&1; then
  scripts/build-wasm.sh
fi
