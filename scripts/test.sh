#!/usr/bin/env bash
# README's second command: install fedmq with its test tools, make sure RabbitMQ and
# PostgreSQL answer, then run lint, the type checker ([tool.mypy] in pyproject.toml), the
# import rules and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-wasm-toolchain.sh
scripts/install.sh test
scripts/ensure-services.sh
scripts/ensure-browser.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest "$@"
