"""``fedmq simulate --split`` in full mode: RabbitMQ, Postgres, the aggregate worker, a real
``fedmq worker --queues edge`` process serving every round's edge session (started by the
orchestrator) and ``fedmq device --split`` processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmq.cli import app


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_full_mode_split_federation_serves_its_rounds_from_an_edge_worker(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    args = ["--split", "--clients", "2", "--rounds", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(
        app,
        ["simulate", *args, "--broker", amqp_url, "--database", pg_url],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rounds = json.loads((tmp_path / "split_metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["resumed"] for r in rounds] == [False, True]
    assert rounds[-1]["accuracy"] > 0.5
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["device-0.log", "device-1.log", "edge-worker.log", "worker.log"]
    assert "fedmq.edge.session" in (tmp_path / "logs" / "edge-worker.log").read_text()
