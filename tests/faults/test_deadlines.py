"""Time faults: a device far slower than the round deadline, and a round whose quorum is
never reached. Rounds close or fail on time; nothing late is counted; nothing is stuck."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db.models import ParticipationState
from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.faults.invariants import Invariants
from tests.faults.support import acked, runs, scenario, wait_acked, wait_ready
from tests.integration.orchestrator_harness import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

DEADLINE_S = 2.0


@pytest.mark.timeout(60 + 20 * runs(2))
def test_a_device_slower_than_the_deadline_is_never_counted(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("slow", "device 2-3x slower than the deadline")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        policy = RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=DEADLINE_S)
        h.create_run(policy)
        inv = Invariants(h.sessions, h.run_id)
        h.procs.orchestrator()
        fast = [h.client(f"fast{i}", train_s=r.uniform(0.1, 0.5)) for i in range(2)]
        slow = h.client("slow", train_s=r.uniform(2, 3) * DEADLINE_S)
        clients = [*fast, slow]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=n)
        for k in range(1, n + 1):
            opened = time.monotonic()
            rnd = h.wait_round_state(k, {"done"}, 30)
            tally.recovery_s.append(round(time.monotonic() - opened, 2))
            inv.verify()
            counted = {
                p.client_id for p in h.participations(k) if p.state == ParticipationState.UPDATE
            }
            assert slow.client_id not in counted and rnd.received == len(counted)
            tally.runs += 1
        # Let the slow device's last update arrive (and be refused) before the check.
        h.wait(lambda: len(slow.sent) >= 1, 20, "the slow device to send")
        time.sleep(1.0)
        ids = acked(clients)
        tally.stored = inv.check(ids)
        assert not [n for n in slow.notices if n.kind == "update.accepted"]
        tally.sent = sum(len(c.sent) for c in clients)
        tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
    tally.write()
    assert tally.stored == tally.acknowledged


@pytest.mark.timeout(60 + 15 * runs(2))
def test_a_round_whose_quorum_is_never_reached_fails_on_time(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("quorum", "quorum never reached")
    n = runs(2)
    with harness(amqp_url, pg_url, tmp_path) as h:
        policy = RoundPolicy(
            min_clients=3, quorum_fraction=1.0, deadline_s=DEADLINE_S, max_attempts=2
        )
        h.procs.orchestrator()
        for k in range(1, n + 1):  # a fresh run each time: a failed round ends the autorun
            h.create_run(policy, name=f"quorum-{k}")
            inv = Invariants(h.sessions, h.run_id)
            clients = [h.client(f"c{i}", train_s=r.uniform(0.1, 0.5)) for i in range(2)]
            clients.append(h.client("mute", hold_updates=True))
            wait_ready(h, clients)
            h.command(CommandAction.AUTORUN, rounds=1)
            opened = time.monotonic()
            rnd = h.wait_round_state(1, {"failed"}, 10 + 3 * DEADLINE_S)
            took = time.monotonic() - opened
            tally.recovery_s.append(round(took, 2))
            assert rnd.attempt == 2 and rnd.model_version_id is None
            assert took < 2 * DEADLINE_S + 8, f"failed only after {took:.1f} s"
            wait_acked(h, clients, 2)  # the two that answered; the mute one never does
            ids = acked(clients)
            tally.stored += inv.check(ids)
            tally.runs += 1
            tally.sent += sum(len(c.sent) for c in clients)
            tally.acknowledged += len(set(ids))
    tally.write()
    assert tally.stored == tally.acknowledged == 2 * n


@pytest.mark.timeout(150)
def test_a_round_whose_deadline_passed_while_the_orchestrator_was_away_ends_once_it_is_back(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    """Issue 17: a round stayed open 46 minutes past its deadline while the orchestrator was
    down. Back, its first ticks close the round (or fail the attempt and retry it)."""
    _, tally = scenario("deadline-away", "deadline passed while the orchestrator was away")
    with harness(amqp_url, pg_url, tmp_path) as h:
        policy = RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=3.0)
        h.create_run(policy)
        orch = h.procs.orchestrator("orchestrator-0")
        clients = [h.client("c0", train_s=0.1), h.client("mute", hold_updates=True)]
        wait_ready(h, clients)
        h.command(CommandAction.AUTORUN, rounds=1)
        h.wait_round_state(1, {"open"}, 30)
        h.procs.kill(orch)
        time.sleep(3.0 + 3.0)  # the deadline passes with nobody to see it
        assert str(h.round(1).state) == "open"  # type: ignore[union-attr]
        h.procs.orchestrator("orchestrator-1")
        back = time.monotonic()

        def ended() -> bool:
            r = h.round(1)
            return r is not None and (str(r.state) != "open" or r.attempt > 1)

        # Within a few ticks of the process being up (it imports, migrates, connects first).
        h.wait(ended, 20, "round 1 to close or be retried")
        tally.recovery_s.append(round(time.monotonic() - back, 2))
        h.wait_round_state(1, {"done"}, 60)
        tally.runs = 1
    tally.write()
