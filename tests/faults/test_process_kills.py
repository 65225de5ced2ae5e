"""SIGKILL at random points: the orchestrator while updates arrive, a Celery worker while it
folds, a device halfway through a chunked upload. Real RabbitMQ, Postgres, orchestrator and
worker processes; devices are ``LightClient``s. Each run ends with the invariant check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db import queries as q
from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.faults.invariants import Invariants
from tests.faults.support import (
    acked,
    kill_worker_in_each_aggregation,
    make_update,
    runs,
    scenario,
    wait_acked,
    wait_models,
    wait_ready,
)
from tests.integration.orchestrator_harness import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(60 + 40 * runs(2))
def test_orchestrator_sigkilled_at_random_points(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("orchestrator-kill", "orchestrator SIGKILL mid-round")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(RoundPolicy(min_clients=4, quorum_fraction=1.0, deadline_s=60))
        inv = Invariants(h.sessions, h.run_id)
        orch = h.procs.orchestrator("orchestrator-0")
        # Uploads of ~10 chunks with a pause between, so kills land mid-upload too.
        clients = [
            h.client(f"c{i}", chunk_size=64, chunk_delay_s=0.03, train_s=r.uniform(0.1, 1.0))
            for i in range(4)
        ]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        for k in range(1, n + 1):
            h.wait_round_state(k, {"open"}, 40)
            time.sleep(r.uniform(0.0, 1.6))  # before, during or after the uploads
            h.procs.kill(orch)
            killed = time.monotonic()
            orch = h.procs.orchestrator(f"orchestrator-{k}")
            h.wait_round_state(k, {"done"}, 60)
            tally.recovery_s.append(round(time.monotonic() - killed, 2))
            inv.verify()
            tally.runs += 1
        wait_acked(h, clients, 4 * n)
        ids = acked(clients)
        tally.stored = inv.check(ids)
        tally.sent = sum(len(c.sent) for c in clients)
        tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
    tally.write()
    assert tally.stored == tally.sent == 4 * n


@pytest.mark.timeout(60 + 40 * runs(2))
def test_worker_sigkilled_during_aggregation(amqp_url: str, pg_url: str, tmp_path: Path) -> None:
    r, tally = scenario("worker-kill", "worker SIGKILL during aggregation")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
        # A test-only pause after each folded update (0.4 s x 4) gives the kill a window.
        h.procs.env["FEDMQ_TEST_AGGREGATE_DELAY_S"] = "0.4"
        worker = h.procs.worker()
        h.create_run(RoundPolicy(min_clients=4, quorum_fraction=1.0, deadline_s=60))
        inv = Invariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        clients = [h.client(f"c{i}") for i in range(4)]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        worker = kill_worker_in_each_aggregation(
            h, r, tally, worker, n, inv.verify, max_delay_s=1.4, start_timeout=40, done_timeout=60
        )
        wait_acked(h, clients, 4 * n)
        ids = acked(clients)
        tally.stored = inv.check(ids)
        versions = h.read(lambda s: len(q.list_model_versions(s, h.run_id)))
        assert versions == n + 1, "one model version per round, plus the initial one"
        tally.sent = sum(len(c.sent) for c in clients)
        tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
    tally.write()
    assert tally.stored == tally.sent == 4 * n


@pytest.mark.timeout(60 + 30 * runs(2))
def test_device_dies_mid_upload_and_sends_again(amqp_url: str, pg_url: str, tmp_path: Path) -> None:
    """Half a chunked blob is sent, the device "dies" (nothing more of that upload ever
    comes), then, back again, sends its update whole: counted once, the half never."""
    r, tally = scenario("device-kill", "device dies mid-upload")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(RoundPolicy(min_clients=3, quorum_fraction=1.0, deadline_s=60))
        inv = Invariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        steady = [h.client(f"c{i}") for i in range(2)]
        flaky = h.client("flaky", hold_updates=True)
        clients = [*steady, flaky]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        halves = 0
        for k in range(1, n + 1):
            h.wait_round_state(k, {"open"}, 40)
            h.wait(lambda k=k: any(a.round == k for a in flaky.announcements), 20, "announce")
            version = next(a.model_version for a in flaky.announcements if a.round == k)
            wait_models(h, [flaky], version)
            half = make_update(flaky, k, version, chunk_size=64, seed=k)
            cut = r.randint(1, len(half.chunks) - 1)
            tally.sent += 1
            half.publish(h, 0, cut)  # ... and the device is gone
            died = time.monotonic()
            time.sleep(r.uniform(0.0, 1.0))
            whole = make_update(flaky, k, version, chunk_size=64, seed=1000 + k)
            whole.publish(h)
            tally.sent += 1
            h.wait_round_state(k, {"done"}, 60)
            tally.recovery_s.append(round(time.monotonic() - died, 2))
            inv.verify()
            parts = {p.client_id: p for p in h.participations(k)}
            assert parts[flaky.client_id].message_id == whole.meta.message_id
            halves += 1
            tally.runs += 1
        wait_acked(h, clients, 3 * n)
        ids = acked(clients)
        assert half.meta.message_id not in ids
        tally.stored = inv.check(ids)
        tally.sent += sum(len(c.sent) for c in steady)
        tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
    tally.write()
    assert tally.stored == 3 * n and halves == n
