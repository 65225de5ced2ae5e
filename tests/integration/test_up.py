"""`fedmq up` runs the whole stack natively: a fleet of 3 devices completes 2 rounds, the
dashboard and the gateway answer, and Ctrl-C stops every process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.broker_users import enrollment_user
from orchestrator.accounts import ManagementAccounts, vhost_of
from protocol.messages import RoundState
from tests.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _wait_for(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.3)
    return False


def _http_status(url: str, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status)
        except OSError:
            time.sleep(0.5)
    return None


def _done_rounds(pg_url: str) -> list[int]:
    engine = make_engine(pg_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            runs = q.list_runs(s)
            return [
                sum(1 for r in q.list_rounds(s, run.id) if r.state == RoundState.DONE)
                for run in runs
            ]
    finally:
        engine.dispose()


def _client_ids(pg_url: str) -> list[str]:
    engine = make_engine(pg_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            return [c.id for run in q.list_runs(s) for c in q.list_clients(s, run.id)]
    finally:
        engine.dispose()


@pytest.fixture
def broker_users(management_url: str, amqp_url: str, pg_url: str) -> Iterator[ManagementAccounts]:
    """The management API; afterwards the users `fedmq up` made for this test's vhost (the
    enrollment user, one per device) are deleted: users are the broker's, not the vhost's."""
    api = ManagementAccounts(management_url, vhost_of(amqp_url))
    try:
        yield api
    finally:
        for user in [enrollment_user(vhost_of(amqp_url)), *_client_ids(pg_url)]:
            api.revoke(user)
        api.close()


def test_up_runs_the_whole_stack_with_a_fleet_and_ctrl_c_stops_everything(
    tmp_path: Path, amqp_url: str, pg_url: str, broker_users: ManagementAccounts
) -> None:
    gateway, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_GATEWAY_PORT": str(gateway),
        "FEDMQ_DASHBOARD_PORT": str(dashboard),
        "FEDMQ_HEARTBEAT_INTERVAL_S": "1",
        "FEDMQ_DATA_DIR": str(tmp_path / "state"),  # where up keeps the token it makes
    }
    logs = tmp_path / "logs"
    argv = ["up", "--logs", str(logs), "--fleet", "3", "--fleet-rounds", "2"]
    console = tmp_path / "up.out"
    with console.open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *argv],
            env={**env, "COLUMNS": "200"},
            stdout=out_file,
            stderr=subprocess.STDOUT,
        )
    try:
        fleet_log = logs / "fleet.log"
        assert _wait_for(console, "fleet finished with 0", 180), console.read_text(
            errors="replace"
        ) + fleet_log.read_text(errors="replace")
        assert "2 rounds in" in fleet_log.read_text()
        assert _done_rounds(pg_url) == [2]
        # Per-device broker users by default (issue 17): the fleet registered through the
        # enrollment user, and each device got a user of its own.
        assert "get broker users of their own" in console.read_text()
        assert broker_users.exists(enrollment_user(vhost_of(amqp_url)))
        clients = _client_ids(pg_url)
        assert len(clients) == 3 and all(broker_users.exists(c) for c in clients), clients
        assert _http_status(f"http://127.0.0.1:{dashboard}/", 60) == 200
        assert _http_status(f"http://127.0.0.1:{dashboard}/_stcore/health", 30) == 200
        assert _http_status(f"http://127.0.0.1:{gateway}/docs", 30) == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:  # a failed check: still stop the stack the way a user does
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = console.read_text()
    assert proc.returncode == 0, out
    for name in ("orchestrator", "worker", "gateway", "dashboard"):
        assert f"stopped {name}" in out, out
    pids = [
        int(line.split("pid ")[1].split(")")[0]) for line in out.splitlines() if "(pid " in line
    ]
    assert len(pids) == 5
    for pid in pids:  # every child is gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_up_refuses_the_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "up", "--logs", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "needs real services" in done.stdout


def test_up_restarts_a_killed_service_and_the_federation_goes_on(
    tmp_path: Path, amqp_url: str, pg_url: str, broker_users: ManagementAccounts
) -> None:
    """Issue 17: a service that died stayed dead. SIGKILL the orchestrator mid-autorun:
    `fedmq up` starts it again, says so (console and service_health), and the fleet's
    rounds all complete."""
    from db.queries.health import list_health

    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_HEARTBEAT_INTERVAL_S": "1",
        "COLUMNS": "200",
        "FEDMQ_DATA_DIR": str(tmp_path / "state"),
    }
    logs = tmp_path / "logs"
    argv = ["up", "--logs", str(logs), "--no-gateway", "--no-dashboard"]
    argv += ["--fleet", "2", "--fleet-rounds", "3"]
    console = tmp_path / "up.out"
    with console.open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *argv],
            env=env,
            stdout=out_file,
            stderr=subprocess.STDOUT,
        )
    try:
        assert _wait_for(console, "started fleet", 60), console.read_text()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(_done_rounds(pg_url)):
            time.sleep(1)
        assert any(_done_rounds(pg_url)), console.read_text()
        text = console.read_text()
        pid = int(text.split("started orchestrator (pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        assert _wait_for(console, "restarted orchestrator", 30), console.read_text()
        assert "orchestrator exited with -9; restarting in" in console.read_text()
        assert _wait_for(console, "fleet finished with 0", 180), console.read_text()
        assert _done_rounds(pg_url) == [3]
        engine = make_engine(pg_url)
        with session_scope(make_sessionmaker(engine)) as s:
            rows = {r.name: (r.state, r.reconnects) for r in list_health(s)}
        engine.dispose()
        assert rows["up orchestrator"] == ("running", 1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, console.read_text()
