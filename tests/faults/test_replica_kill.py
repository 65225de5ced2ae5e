"""Orchestrator replicas: three ``fedmq orchestrator`` processes share three runs (one each),
devices upload in chunks, and in every round one replica is SIGKILLed mid-round: the
survivors take the killed one's runs (its Postgres session, and the advisory lock on it, die
with the process, so at their next lease renewal), a replacement joins and gets its share
back from them while the round goes on, the rounds complete, and the invariant check finds
nothing lost and nothing counted twice in any run. Real RabbitMQ, Postgres, Celery worker and
orchestrator processes; devices are ``LightClient``s."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from db import queries as q
from db.queries import leases as lq
from orchestrator.state import RoundPolicy
from protocol import auth, topology
from protocol.messages import Command, CommandAction
from tests.faults.invariants import Invariants
from tests.faults.support import acked, runs, scenario, wait_acked, wait_ready
from tests.integration.lightclient import LightClient
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Harness, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

RUNS = 3
REPLICAS = 3
CLIENTS = 3  # per run


def holders(h: Harness) -> dict[str, str]:
    return dict(h.read(lq.lease_holders))


def autorun(h: Harness, run_id: str) -> None:
    cmd = auth.sign(Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=1), OPERATOR_TOKEN)
    h.bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())


def round_is(h: Harness, run_id: str, number: int, state: str) -> Callable[[], bool]:
    def check() -> bool:
        rnd = h.read(lambda s: q.get_round(s, run_id, number))
        return rnd is not None and str(rnd.state) == state

    return check


@pytest.mark.timeout(120 + 60 * runs(2))
def test_a_replica_sigkilled_mid_round_hands_its_runs_to_the_others(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("replica-kill", "orchestrator replica SIGKILL (3 replicas, 3 runs)")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        policy = RoundPolicy(min_clients=CLIENTS, quorum_fraction=1.0, deadline_s=60)
        run_ids = [h.create_run(policy, name=f"run{k}") for k in range(RUNS)]
        procs = {
            f"replica-{i}": h.procs.orchestrator(
                f"replica-{i}", None, "--replica-id", f"replica-{i}"
            )
            for i in range(REPLICAS)
        }
        # Fair share: one run each, once all three have renewed a couple of times.
        h.wait(
            lambda: (
                sorted(Counter(holders(h).values()).values()) == [1] * REPLICAS
                and set(holders(h)) == set(run_ids)
            ),
            40,
            "one run per replica",
        )
        clients = {
            run_id: [
                LightClient(
                    h.bus,
                    run_id,
                    f"r{k}c{i}",
                    # Uploads of ~10 chunks with a pause between, so kills land mid-upload.
                    chunk_size=64,
                    chunk_delay_s=0.03,
                    train_s=r.uniform(0.1, 1.0),
                )
                for i in range(CLIENTS)
            ]
            for k, run_id in enumerate(run_ids)
        }
        everyone = [c for cs in clients.values() for c in cs]
        for c in everyone:
            h.clients.append(c.start())
        wait_ready(h, everyone)
        invariants = {run_id: Invariants(h.sessions, run_id) for run_id in run_ids}
        for k in range(1, n + 1):
            # One round at a time, so that round k is surely open (not done already) when
            # the kill comes.
            for run_id in run_ids:
                autorun(h, run_id)
            target = run_ids[(k - 1) % RUNS]
            h.wait(round_is(h, target, k, "open"), 40, f"round {k} open")
            time.sleep(r.uniform(0.0, 1.6))  # before, during or after the uploads
            victim = holders(h)[target]
            h.procs.kill(procs.pop(victim))  # SIGKILL: mid-ingest, its leases still valid
            killed = time.monotonic()
            h.wait(
                lambda: set(holders(h)) == set(run_ids) and set(holders(h).values()) <= set(procs),
                30,
                f"{victim}'s runs taken by the survivors",
            )
            tally.recovery_s.append(round(time.monotonic() - killed, 2))
            # A replacement joins mid-round: the survivors hand it its share under load.
            new = f"replica-{REPLICAS + k - 1}"
            procs[new] = h.procs.orchestrator(new, None, "--replica-id", new)
            for run_id in run_ids:
                h.wait(round_is(h, run_id, k, "done"), 60, f"round {k} of {run_id} done")
                invariants[run_id].verify()
            tally.runs += 1
        wait_acked(h, everyone, RUNS * CLIENTS * n)
        for run_id in run_ids:
            ids = acked(clients[run_id])
            tally.stored += invariants[run_id].check(ids)
            tally.acknowledged += len(set(ids))
            tally.aggregated += invariants[run_id].stored
        tally.sent = sum(len(c.sent) for c in everyone)
        # Fair share again, replacements included: one run each, all held by live replicas.
        h.wait(
            lambda: (
                sorted(Counter(holders(h).values()).values()) == [1] * REPLICAS
                and set(holders(h).values()) <= set(procs)
            ),
            30,
            "one run per live replica",
        )
    tally.write()
    assert tally.stored == tally.sent == RUNS * CLIENTS * n
