"""Devices that misbehave on the wire: the same update three times, an update for a round
already closed, another client's update replayed under one's own token (and verbatim).
None of it counts twice or for the wrong client; each refusal is an ``update.refused``
event (what the dashboard's event list shows)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from db import queries as q
from db.models import Event
from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.faults.invariants import Invariants, InvariantViolation
from tests.faults.support import (
    acked,
    make_update,
    runs,
    scenario,
    wait_acked,
    wait_models,
    wait_ready,
)
from tests.integration.orchestrator_harness import Harness, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(60 + 25 * runs(2))
def test_duplicates_late_updates_and_replays_count_once(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("wire", "duplicate x3, closed-round update, replays")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(RoundPolicy(min_clients=3, quorum_fraction=1.0, deadline_s=60))
        inv = Invariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        a, b, c = clients = [h.client(x, hold_updates=True) for x in ("a", "b", "c")]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        refusals = 0
        for k in range(1, n + 1):
            h.wait(
                lambda k=k: all(any(x.round == k for x in cl.announcements) for cl in clients),
                30,
                f"round {k} announced",
            )
            version = next(x.model_version for x in a.announcements if x.round == k)
            wait_models(h, clients, version)
            # b speaks for a with b's own token: refused before anything is staged.
            spoof = make_update(b, k, version, client_id=a.client_id, seed=7 * k)
            ua = make_update(a, k, version, seed=k)
            ub = make_update(b, k, version, seed=100 + k)
            uc = make_update(c, k, version, seed=200 + k)
            # a's message (id, blob id, chunks) three times, and once more replayed verbatim
            # by someone else; all of it in a random order.
            wire = [spoof, ua, ua, ua, ua, ub, uc]
            r.shuffle(wire)
            for u in wire:
                u.publish(h)
            tally.sent += len(wire)
            tally.duplicates += 4  # 2 repeats + 1 verbatim replay + 1 spoof
            h.wait_round_state(k, {"done"}, 40)
            inv.verify()
            want = {
                a.client_id: ua.meta.message_id,
                b.client_id: ub.meta.message_id,
                c.client_id: uc.meta.message_id,
            }
            assert {p.client_id: p.message_id for p in h.participations(k)} == want
            # An update for the round just closed (from a client counted in it: the ingest
            # acks it as a duplicate of the counted one, drops it and records that).
            late = make_update(c, k, version, seed=300 + k)
            late.publish(h)
            tally.sent += 1
            h.wait(
                lambda late=late: any(
                    e.message_id == late.meta.message_id for e in h.events("update.duplicate")
                ),
                20,
                "the late update recorded as a duplicate",
            )
            dup = next(
                e for e in h.events("update.duplicate") if e.message_id == late.meta.message_id
            )
            assert dup.detail["counted"] == uc.meta.message_id
            assert (dup.client_id, dup.round) == (c.client_id, k)
            refusals += len(spoof.chunks)  # the spoof is refused chunk by chunk
            h.wait(
                lambda refusals=refusals: len(refused_events(h)) >= refusals,
                20,
                "the spoof refused",
            )
            time.sleep(0.3)
            assert {p.client_id: p.message_id for p in h.participations(k)} == want
            inv.verify()
            tally.runs += 1
        time.sleep(0.5)  # nothing of the duplicates may still be in flight
        reasons = [e.detail.get("reason", "") for e in refused_events(h)]
        assert len(reasons) == refusals, reasons
        assert all("bad MAC" in x for x in reasons), reasons
        wait_acked(h, clients, 3 * n)
        ids = acked(clients)
        tally.stored = inv.check(ids)
        assert len(set(ids)) == 3 * n
        tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
        _the_check_is_not_vacuous(h, ids)
    tally.write()
    assert tally.stored == 3 * n


def _the_check_is_not_vacuous(h: Harness, ids: list[str]) -> None:
    """The same check fails on a lost acknowledgement and on a tampered weight."""
    with pytest.raises(InvariantViolation, match="in 0 rows"):
        Invariants(h.sessions, h.run_id).check([*ids, "an-acknowledged-but-lost-update"])

    def tamper(s: Session) -> None:
        rnd = q.get_round(s, h.run_id, 1)
        assert rnd is not None
        q.received_updates(s, rnd.id)[0].num_samples = 999

    h.read(tamper)
    with pytest.raises(InvariantViolation, match="differs from FedAvg"):
        Invariants(h.sessions, h.run_id).verify()


def refused_events(h: Harness) -> list[Event]:
    """Refusals before the sender is authenticated carry no run id (the run named in an
    unauthenticated message may not exist): read them database-wide (one test, one DB)."""

    def get(s: Session) -> list[Event]:
        rows = q.list_events(s, None, kinds=["update.refused"], limit=1000)
        for e in rows:
            s.expunge(e)
        return rows

    return list(h.read(get))
