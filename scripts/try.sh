#!/usr/bin/env bash
# README's first command: install fedmq and run it with embedded defaults (no server needed).
# Extra arguments go to `fedmq demo` (e.g. --broker amqp://guest:guest@127.0.0.1:5672/%2F).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/fedmq demo "$@"
