"""``fedmq simulate --split``: a SplitFed federation in process learns, and says so."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedmq.cli import app


def test_simulate_split_runs_rounds_and_the_composed_model_learns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["simulate", "--split", "--clients", "2", "--rounds", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "split_metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["accuracy"] > 0.5  # digits, 10 classes: chance is 0.1
    assert all(r["bytes_sent"] > 0 for r in rounds)
