#!/usr/bin/env bash
# Builds the WASM device kernels: devices/wasm/kernels.c -> devices/wasm/kernels.wasm, with
# Debian's clang and lld (scripts/ensure-wasm-toolchain.sh installs them). Freestanding wasm32,
# no libc, explicit exports, no imports; stripped, so the bytes depend only on the source
# and the compiler (tests/unit/test_wasm_build.py rebuilds and compares).
# Usage: scripts/build-wasm.sh [output.wasm]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-devices/wasm/kernels.wasm}"
clang --target=wasm32 -O3 -msimd128 -mbulk-memory -nostdlib -ffreestanding \
  -fno-builtin -Wall -Wextra -Werror -Wno-unused-parameter \
  -Wl,--no-entry -Wl,--strip-all -Wl,-z,stack-size=65536 \
  -o "$out" devices/wasm/kernels.c
chmod 644 "$out"
