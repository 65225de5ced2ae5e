#!/usr/bin/env bash
# README's first command: install fedmq and run it with embedded defaults (no server needed).
# Extra arguments go to `fedmq simulate` (see `fedmq simulate --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/fedmq simulate "$@"
