#!/usr/bin/env bash
# Regenerates requirements.lock: every dependency of fedmq and of its test and flower
# extras, pinned, for Python 3.11 to 3.13 on any platform (`uv pip compile --universal`),
# within the hand-kept pins of constraints.txt. scripts/install.sh installs under it.
# Run after changing a dependency in pyproject.toml or a pin in constraints.txt, and commit
# the result with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-tools/bin/uv ]; then
  python3 -m venv .venv-tools
  .venv-tools/bin/pip install -q --disable-pip-version-check "uv>=0.9,<1"
fi
.venv-tools/bin/uv pip compile pyproject.toml --extra test --extra flower \
  --universal --python-version 3.11 --prerelease disallow -c constraints.txt \
  --no-header --quiet -o requirements.lock.tmp
{
  echo "# requirements.lock: every dependency of fedmq[test,flower], pinned, for Python 3.11-3.13."
  echo "# Generated from pyproject.toml and constraints.txt by scripts/lock.sh:"
  echo "#   uv pip compile pyproject.toml --extra test --extra flower --universal \\"
  echo "#     --python-version 3.11 --prerelease disallow -c constraints.txt"
  echo "# Do not edit by hand: change pyproject.toml or constraints.txt and run scripts/lock.sh."
  echo "# scripts/install.sh installs under these pins (as pip constraints), whatever the extras."
  cat requirements.lock.tmp
} > requirements.lock
rm -f requirements.lock.tmp
echo "requirements.lock: $(grep -c '^[a-zA-Z0-9]' requirements.lock) pins"
