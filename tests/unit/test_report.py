"""A finished federation's outputs: JSON that round-trips and a PNG that is a real image."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from simulation.report import RoundRow, plot_accuracy, summary_table, write_json

ROWS = [
    RoundRow(1, 0.5, 1.2, 3, 0.4, 1000, 2000),
    RoundRow(2, 0.8, 0.6, 3, 0.3, 1000, 2000),
    RoundRow(3, None, None, 2, 0.2),
]


def test_per_round_json_holds_every_round_and_the_config(tmp_path: Path) -> None:
    path = write_json(tmp_path / "out" / "metrics.json", ROWS, {"clients": 3})
    data = json.loads(path.read_text())
    assert data["config"] == {"clients": 3}
    assert [r["accuracy"] for r in data["rounds"]] == [0.5, 0.8, None]


def test_accuracy_plot_is_a_png(tmp_path: Path) -> None:
    path = plot_accuracy(tmp_path / "acc.png", {"fedavg": ROWS}, "digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_table_shows_every_round() -> None:
    console = Console(record=True, width=120)
    console.print(summary_table(ROWS, "run"))
    text = console.export_text()
    assert "80.00%" in text and "-" in text
