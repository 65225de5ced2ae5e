"""Async (FedBuff) runs under faults: the orchestrator SIGKILLed while updates are being
buffered, a Celery worker SIGKILLed while it folds a version step, duplicate deliveries
(the same message again, a second update for a consumed ticket) and an update for an
expired ticket. Real RabbitMQ, Postgres, orchestrator and worker processes; devices are
``LightClient``s. Each run ends with the async invariant check (``async_invariants.py``):
every acknowledged update counted in exactly one version (or waiting, or dropped with a
reason), every version recomputed from its stored blobs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db import queries as q
from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.faults.async_invariants import AsyncInvariants
from tests.faults.support import (
    acked,
    kill_worker_in_each_aggregation,
    make_update,
    runs,
    scenario,
    wait_acked,
    wait_ready,
)
from tests.integration.lightclient import LightClient
from tests.integration.orchestrator_harness import RunView, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def _policy(**kw: object) -> RoundPolicy:
    base: dict[str, object] = dict(
        mode="async", min_clients=1, buffer_size=3, max_staleness=3, concurrency=4, deadline_s=30
    )
    return RoundPolicy(**{**base, **kw})  # type: ignore[arg-type]


def _buffered(h: RunView) -> int:
    return len(h.events("update.buffered"))


def _finish(h: RunView, inv: AsyncInvariants, clients: list[LightClient], steps: int) -> int:
    """Wait for ``steps`` versions, quiet the devices, check; returns the acknowledged."""
    h.wait_round_state(steps, {"done"}, 90)
    for c in clients:
        c.hold_updates = True  # no new training; one under way finishes and sends
    time.sleep(2.0)  # longer than a training (train_s <= 1 s) and its upload
    sent = {u.message_id for c in clients for u in c.sent}

    def notified() -> bool:
        buffered = {e.message_id for e in h.events("update.buffered")} & sent
        return buffered <= set(acked(clients))

    # The notices trail the commit (outbox -> device queue): wait for those of every
    # buffered update before the devices stop listening.
    h.wait(notified, 30, "update.accepted notices of the buffered updates")
    for c in clients:
        c.stop()
    ids = acked(clients)
    inv.check(ids)
    return len(set(ids))


@pytest.mark.timeout(90 + 60 * runs(2))
def test_orchestrator_sigkilled_while_buffering(amqp_url: str, pg_url: str, tmp_path: Path) -> None:
    r, tally = scenario("async-orchestrator-kill", "async: orchestrator SIGKILL while buffering")
    n = runs(2)
    steps = 2 * n + 1
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(_policy())
        inv = AsyncInvariants(h.sessions, h.run_id)
        orch = h.procs.orchestrator("orchestrator-0")
        # Chunked uploads with pauses, so kills land mid-upload and mid-count too.
        clients = [
            h.client(f"c{i}", chunk_size=64, chunk_delay_s=0.02, train_s=r.uniform(0.2, 1.0))
            for i in range(5)
        ]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=steps)
        for k in range(1, n + 1):
            seen = _buffered(h)
            h.wait(lambda seen=seen: _buffered(h) > seen, 60, "an update buffered")
            time.sleep(r.uniform(0.0, 1.2))
            h.procs.kill(orch)
            killed = time.monotonic()
            orch = h.procs.orchestrator(f"orchestrator-{k}")
            after = _buffered(h)
            h.wait(lambda after=after: _buffered(h) > after, 60, "buffering again")
            tally.recovery_s.append(round(time.monotonic() - killed, 2))
            inv.verify()
            tally.runs += 1
        tally.acknowledged = _finish(h, inv, clients, steps)
        tally.sent = sum(len(c.sent) for c in clients)
        tally.stored, tally.aggregated = _buffered(h), inv.stored
    tally.write()
    assert tally.acknowledged >= 3 * steps and tally.aggregated == 3 * len(inv.verified)


@pytest.mark.timeout(90 + 60 * runs(2))
def test_worker_sigkilled_during_a_fold(amqp_url: str, pg_url: str, tmp_path: Path) -> None:
    r, tally = scenario("async-worker-kill", "async: worker SIGKILL during a fold")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
        # A test-only pause after each folded update (0.4 s x 3) gives the kill a window.
        h.procs.env["FEDMQ_TEST_AGGREGATE_DELAY_S"] = "0.4"
        worker = h.procs.worker()
        # A generous bound: no update may become too stale while the worker is down.
        h.create_run(_policy(max_staleness=20))
        inv = AsyncInvariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        clients = [h.client(f"c{i}", train_s=r.uniform(0.1, 0.6)) for i in range(4)]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        worker = kill_worker_in_each_aggregation(
            h,
            r,
            tally,
            worker,
            n,
            inv.verify,
            max_delay_s=1.0,
            start_timeout=60,
            done_timeout=90,
            what="the fold of step",
        )
        tally.acknowledged = _finish(h, inv, clients, n)
        versions = h.read(lambda s: [v.version for v in q.list_model_versions(s, h.run_id)])
        assert versions == list(range(n + 1)), "one version per step, plus the initial one"
        tally.sent = sum(len(c.sent) for c in clients)
        tally.stored, tally.aggregated = _buffered(h), inv.stored
    tally.write()
    assert tally.aggregated == 3 * n


@pytest.mark.timeout(180)
def test_duplicate_and_stale_updates_count_once_or_not_at_all(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    """The same message delivered again; a second update (new message id) for a ticket
    already buffered; an update for a ticket that expired past its deadline: the first
    counts once, the second is ignored, the expired one refused with the reason."""
    _, tally = scenario("async-duplicates", "async: duplicate and stale updates")
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(_policy(buffer_size=2, concurrency=3, deadline_s=4))
        inv = AsyncInvariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        steady = [h.client(f"c{i}", train_s=0.2) for i in range(2)]
        held = h.client("held", hold_updates=True)
        clients = [*steady, held]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=3)
        h.wait(lambda: bool(held.announcements), 30, "a slot for the held device")
        ann = held.announcements[0]
        h.wait(lambda: ann.model_version in held.models, 30, "its model")
        first = make_update(held, ann.round, ann.model_version, seed=1)
        first.publish(h)
        first.publish(h)  # the same message id again: de-duplicated on ingest
        tally.duplicates += 1
        wait_acked(h, [held], 1, 30)
        second = make_update(held, ann.round, ann.model_version, seed=2)
        second.publish(h)  # a new message for the consumed ticket: ignored
        tally.duplicates += 1
        tally.sent += 3
        # Its next slot expires (deadline 4 s, it holds its update); then it sends.
        h.wait(lambda: len(held.announcements) >= 2, 60, "a second slot for the held device")
        late = held.announcements[1]
        h.wait(
            lambda: any(
                e.client_id == held.client_id and e.detail.get("ticket") == late.round
                for e in h.events("async.slot_expired")
            ),
            60,
            "the second slot to expire",
        )
        h.wait(lambda: late.model_version in held.models, 30, "its model")
        stale = make_update(held, late.round, late.model_version, seed=3)
        stale.publish(h)
        tally.sent += 1
        h.wait(
            lambda: any(
                n.kind == "update.rejected" and n.correlation_id == stale.meta.message_id
                for n in list(held.notices)
            ),
            30,
            "the expired ticket's update refused",
        )
        reason = next(
            n.detail["reason"]
            for n in list(held.notices)
            if n.correlation_id == stale.meta.message_id
        )
        assert f"ticket {late.round}" in reason and "expired" in reason and "deadline" in reason
        buffered = [e for e in h.events("update.buffered") if e.client_id == held.client_id]
        assert [e.message_id for e in buffered] == [first.meta.message_id]
        tally.acknowledged = _finish(h, inv, clients, 3)
        tally.sent += sum(len(c.sent) for c in steady)
        tally.stored, tally.aggregated = _buffered(h), inv.stored
        tally.runs = 1
    tally.write()
    assert held.client_id is not None
