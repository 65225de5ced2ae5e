"""Full mode under faults: real device processes, a Celery worker and the orchestrator on
RabbitMQ + Postgres; a device SIGKILLed in round 2 and the broker restarted between rounds.
Nobody is restarted by hand: services and devices reconnect by themselves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from db import queries as q
from db.models import ClientState, ParticipationState
from fedmq.settings import Settings
from protocol.messages import CommandAction
from simulation.simulate import SimOptions, create_sim_run
from tests.integration.orchestrator_harness import ROOT, Harness, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

CLIENTS = 3


def _rabbitmq_restart() -> None:
    for args in (["stop_app"], ["start_app"], ["await_startup"]):
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


SELECTABLE = {ClientState.READY, ClientState.FINISH}  # finish: took part in the last round


def _ready(h: Harness, since: datetime | None = None) -> int:
    """Devices that a round could select now (and that were heard from after ``since``)."""
    rows = h.read(lambda s: [(c.state, c.last_seen) for c in q.list_clients(s, h.run_id)])
    return sum(1 for st, seen in rows if st in SELECTABLE and (since is None or seen > since))


def _autorun_by_cli(h: Harness, rounds: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "command", "autorun", str(rounds), "--run", h.run_id],
        cwd=ROOT,
        env=h.procs.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "sent autorun" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="restarts the local RabbitMQ")
def test_devices_and_services_survive_a_sigkilled_device_and_a_broker_restart(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.procs.env["FEDMQ_HEARTBEAT_INTERVAL_S"] = "0.5"
        settings = Settings(broker_url=amqp_url, database_url=pg_url, heartbeat_interval_s=0.5)
        options = SimOptions(
            clients=CLIENTS,
            rounds=3,
            quorum=0.5,
            min_clients=CLIENTS - 1,
            heartbeat_timeout_s=3.0,
            deadline_s=60,
        )
        h.run_id = create_sim_run(h.sessions, options, settings, prefix="faults")
        h.procs.orchestrator()
        # Device 0 is slow (3 s per round), so that it is surely killed mid-round.
        devices = [
            h.procs.start(
                f"device-{k}",
                *("-m", "fedmq.cli", "device", "--run", h.run_id),
                *("--index", str(k), "--clients", str(CLIENTS)),
                *("--slowdown", "3" if k == 0 else "0"),
            )
            for k in range(CLIENTS)
        ]
        h.wait(lambda: _ready(h) == CLIENTS, 90, f"{CLIENTS} ready devices")

        # Round 1, then the broker goes away and comes back.
        _autorun_by_cli(h, 1)
        h.wait_round_state(1, {"done"}, 60)
        _rabbitmq_restart()
        back = datetime.now(UTC) + timedelta(seconds=1)
        h.wait(lambda: _ready(h, back) == CLIENTS, 90, "every device back after the restart")

        # Round 2: one selected device dies without a word.
        h.command(CommandAction.AUTORUN, rounds=1)
        h.wait_round_state(2, {"open"}, 60)
        h.procs.kill(devices[0])
        r2 = h.wait_round_state(2, {"done"}, 90)

        # Round 3 with the two that are left.
        h.command(CommandAction.AUTORUN, rounds=1)
        r3 = h.wait_round_state(3, {"done"}, 60)

        got = {n: h.participations(n) for n in (1, 2, 3)}
        updates = {
            n: sorted(p.client_id for p in ps if p.state == ParticipationState.UPDATE)
            for n, ps in got.items()
        }
        assert len(updates[1]) == CLIENTS
        assert len(updates[2]) == len(updates[3]) == CLIENTS - 1
        killed = {p.client_id for p in got[1]} - set(updates[2])
        assert len(killed) == 1
        offline = h.events("client.offline")
        assert any(e.detail.get("reason") == "timeout" for e in offline), offline
        acc = [h.round(n).metrics["accuracy"] for n in (1, 2, 3)]  # type: ignore[union-attr]
        assert acc[-1] > 0.3, acc  # chance is 0.1
        assert acc[-1] >= acc[0], acc
        # Exactly one model version per round, and every service still the first process.
        versions = h.read(lambda s: [v.version for v in q.list_model_versions(s, h.run_id)])
        assert sorted(versions) == [0, 1, 2, 3]
        assert r2.model_version_id != r3.model_version_id
        alive = [p for p, _ in h.procs.procs if p.poll() is None]
        assert len(alive) == len(h.procs.procs) - 1, h.procs.output()
