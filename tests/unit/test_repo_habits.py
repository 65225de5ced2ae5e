"""The habits the repository keeps in files: pre-commit runs what scripts/test.sh runs, and
the changelog has a section for the version pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _checks_in_test_sh() -> list[str]:
    lines = (ROOT / "scripts" / "test.sh").read_text().splitlines()
    return [line.strip() for line in lines if re.match(r"\.venv/bin/(ruff|mypy)\b", line)]


def test_pre_commit_runs_the_checks_that_test_sh_runs() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    entries = [hook["entry"] for hook in hooks]
    checks = _checks_in_test_sh()
    assert checks == [".venv/bin/ruff check .", ".venv/bin/mypy"]
    assert [e for e in entries if e in checks] == checks  # the same commands, same order
    assert all(hook["pass_filenames"] is False for hook in hooks)  # whole tree, as CI


def test_the_changelog_has_unreleased_and_the_declared_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "Unreleased"
    assert version in headings
