"""`fedmq simulate` runs a real federation: embedded, and on RabbitMQ + Postgres as processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmq.cli import app


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _accuracies(out: Path) -> list[float]:
    data = json.loads((out / "metrics.json").read_text())
    return [r["accuracy"] for r in data["rounds"]]


def test_an_embedded_federation_learns_digits_and_leaves_its_outputs(tmp_path: Path) -> None:
    _run(["--clients", "3", "--rounds", "3", "--out", str(tmp_path)])
    acc = _accuracies(tmp_path)
    assert len(acc) == 3
    assert acc[-1] > 0.5  # chance is 0.1 (10 classes)
    assert acc[-1] >= acc[0]
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_full_mode_federation_runs_devices_and_a_worker_as_processes(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    _run(
        [
            "--clients",
            "3",
            "--rounds",
            "3",
            "--out",
            str(tmp_path),
            "--broker",
            amqp_url,
            "--database",
            pg_url,
        ]
    )
    acc = _accuracies(tmp_path)
    assert len(acc) == 3 and acc[-1] > 0.5
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["device-0.log", "device-1.log", "device-2.log", "worker.log"]
