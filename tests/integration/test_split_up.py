"""A split run on the real stack: `fedmq up --split` starts the orchestrator, an aggregate
worker and an edge worker; its fleet creates a split run and starts `fedmq device --split`
processes. The orchestrator starts each round's edge session, the evaluate task scores the
composed model: rounds complete with their accuracy, on RabbitMQ and Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models.enums import RoundState
from orchestrator.edge import is_split
from workers.edge.bodies import body_ref
from workers.edge.rounds import SESSION_DONE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]


def _wait_for(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_fedmq_up_runs_a_split_run_with_device_processes_and_records_accuracy(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_HEARTBEAT_INTERVAL_S": "1",
        "FEDMQ_DATA_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }
    logs = tmp_path / "logs"
    argv = ["up", "--logs", str(logs), "--no-gateway", "--no-dashboard", "--split"]
    argv += ["--fleet", "2", "--fleet-rounds", "2"]
    console = tmp_path / "up.out"
    with console.open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *argv],
            env=env,
            stdout=out_file,
            stderr=subprocess.STDOUT,
        )
    try:
        done = _wait_for(console, "fleet finished with", 420)
        fleet_log = (logs / "fleet.log").read_text(errors="replace") if done else ""
        assert done and "fleet finished with 0" in console.read_text(), (
            console.read_text(errors="replace") + fleet_log
        )
        assert "2 rounds in" in fleet_log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = console.read_text()
    assert proc.returncode == 0, out
    assert "started edge-worker" in out and "stopped edge-worker" in out, out

    engine = make_engine(pg_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            (run,) = q.list_runs(s)
            assert is_split(run.config)
            rounds = q.list_rounds(s, run.id)
            done = RoundState.DONE
            assert [(r.number, r.state) for r in rounds] == [(1, done), (2, done)]
            for r in rounds:
                # Recorded by the evaluate task, on the composed model (chance is 0.1).
                assert 0.3 < r.metrics["accuracy"] <= 1.0, r.metrics
                assert r.model_version_id is not None
                mv = q.get_model_version_by_id(s, r.model_version_id)
                assert mv is not None and body_ref(mv.metrics) is not None
                assert mv.metrics["accuracy"] == r.metrics["accuracy"]
            sessions = sorted(
                (e.round, e.detail["attempt"], e.detail["resumed"], e.detail["devices_seen"])
                for e in q.list_events(s, run.id, kinds=[SESSION_DONE])
            )
            # One session per round, each serving both devices, the second from the first's body.
            assert sessions == [(1, 1, False, 2), (2, 1, True, 2)]
    finally:
        engine.dispose()
    edge_log = (logs / "edge-worker.log").read_text(errors="replace")
    assert "fedmq.edge.session" in edge_log
    assert sorted(p.name for p in (logs / "fleet" / "logs").glob("device-*.log")) == [
        "device-0.log",
        "device-1.log",
    ]
