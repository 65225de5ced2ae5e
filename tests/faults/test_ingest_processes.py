"""Ingest processes: one ``fedmq orchestrator --ingest-processes 2`` whose children store
every update (the parent stores none), devices uploading in chunks, and in every round one
child SIGKILLed mid-upload: the parent starts a new one, the round completes, and the
invariant check finds nothing lost and nothing counted twice. Real RabbitMQ, Postgres,
Celery worker and orchestrator processes; devices are ``LightClient``s."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from db import queries as q
from db.models import Replica
from orchestrator.state import RoundPolicy
from protocol import auth, topology
from protocol.messages import Command, CommandAction
from tests.faults.invariants import Invariants
from tests.faults.support import acked, runs, scenario, wait_acked, wait_ready
from tests.integration.lightclient import LightClient
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Harness, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

CLIENTS = 4
CHILDREN = 2


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def autorun(h: Harness, run_id: str) -> None:
    cmd = auth.sign(Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=1), OPERATOR_TOKEN)
    h.bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())


def round_state(h: Harness, run_id: str, number: int) -> str | None:
    rnd = h.read(lambda s: q.get_round(s, run_id, number))
    return None if rnd is None else str(rnd.state)


@pytest.mark.timeout(120 + 60 * runs(2))
def test_ingest_children_store_every_update_and_a_killed_one_is_replaced(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("ingest-kill", "ingest process SIGKILL (2 children)")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        policy = RoundPolicy(min_clients=CLIENTS, quorum_fraction=1.0, deadline_s=60)
        run_id = h.create_run(policy)
        parent = h.procs.orchestrator("orchestrator", None, "--ingest-processes", str(CHILDREN))
        h.wait(lambda: len(children(parent.pid)) == CHILDREN, 30, "two ingest processes")
        clients = [
            LightClient(
                h.bus,
                run_id,
                f"c{i}",
                # Uploads of ~10 chunks with a pause between, so kills land mid-upload.
                chunk_size=64,
                chunk_delay_s=0.03,
                train_s=r.uniform(0.1, 1.0),
            )
            for i in range(CLIENTS)
        ]
        for c in clients:
            h.clients.append(c.start())
        wait_ready(h, clients)
        invariants = Invariants(h.sessions, run_id)
        for k in range(1, n + 1):
            autorun(h, run_id)
            h.wait(lambda k=k: round_state(h, run_id, k) == "open", 40, f"round {k} open")
            time.sleep(r.uniform(0.0, 1.2))  # before, during or after the uploads
            before = children(parent.pid)
            victim = r.choice(before)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            h.wait(
                lambda before=before, victim=victim: (
                    victim not in children(parent.pid)
                    and len(children(parent.pid)) == CHILDREN
                    and set(children(parent.pid)) != set(before)
                ),
                30,
                "a new ingest process in the killed one's place",
            )
            tally.recovery_s.append(round(time.monotonic() - killed, 2))
            h.wait(lambda k=k: round_state(h, run_id, k) == "done", 60, f"round {k} done")
            invariants.verify()
            tally.runs += 1
        wait_acked(h, clients, CLIENTS * n)
        ids = acked(clients)
        tally.stored += invariants.check(ids)
        tally.acknowledged += len(set(ids))
        tally.aggregated += invariants.stored
        tally.sent = sum(len(c.sent) for c in clients)
        assert parent.poll() is None, "the orchestrator exited"
        # The parent (the one replica row: children hold no leases) stored nothing itself:
        # every update went through a child.
        (info,) = h.read(lambda s: [r.info for r in s.query(Replica).all()])
        assert "orchestrator.updates" not in info.get("handled", {}), info
    tally.write()
    assert tally.stored == tally.sent == CLIENTS * n
