#!/usr/bin/env bash
# Makes sure the integration tests have RabbitMQ and PostgreSQL. Uses FEDMQ_TEST_*_URL when
# set; otherwise installs the Debian packages if they are missing (root only) and lets
# tests/services.py start them. testcontainers is the fallback on machines with Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -z "${FEDMQ_TEST_AMQP_URL:-}" ] && ! command -v rabbitmq-server >/dev/null 2>&1 && need+=(rabbitmq-server)
[ -z "${FEDMQ_TEST_DATABASE_URL:-}" ] && ! ls /etc/postgresql/*/main >/dev/null 2>&1 && need+=(postgresql)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  # A fresh Debian cluster asks for passwords on TCP; the tests connect as postgres over loopback.
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    [ -f "$hba" ] && sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/' "$hba"
  done
fi
.venv/bin/python -m tests.services
