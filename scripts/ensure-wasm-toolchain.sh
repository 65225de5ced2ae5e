#!/usr/bin/env bash
# Makes sure the WASM device kernels can be built: Debian's clang (which has the wasm32
# target built in) and lld (which provides wasm-ld). Installs them when missing and this is
# root with apt-get; otherwise says what is missing.
set -euo pipefail
need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v wasm-ld >/dev/null 2>&1 || need+=(lld)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "ensure-wasm-toolchain: missing ${need[*]} (Debian packages); building devices/wasm needs them" >&2
fi
