"""``scripts/gpu-check.sh --dry-run``: the GPU machine's one command, run on the CPU with
tiny sizes, so that it cannot rot between the rare runs on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_dry_run_runs_every_step_and_writes_every_figure(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["env", "pytest-gpu", "aggregate", "split_scenarios"]
    assert all(s[1] == "0" for s in steps), steps
    assert "cuda available" in (tmp_path / "env.txt").read_text()
    # pytest -m gpu collected the GPU tests (skipped here: no CUDA), not nothing.
    junit = (tmp_path / "pytest-gpu.xml").read_text()
    assert 'tests="0"' not in junit and "test_split_gpu" in junit
    agg = json.loads((tmp_path / "aggregate.json").read_text())["results"]
    assert agg["K=2"]["seconds"] > 0 and agg["device"] in ("cpu", "cuda")
    split = json.loads((tmp_path / "split_scenarios.json").read_text())
    assert [r["scenario"] for r in split["rows"]] == [1, 2, 3, 4, 5, 6]
    assert all(r["time_to_train_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in split["rows"])
    assert "| 6 |" in (tmp_path / "split_scenarios.md").read_text()


def test_an_unknown_argument_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check.sh"), "--bogus"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "usage" in done.stderr
