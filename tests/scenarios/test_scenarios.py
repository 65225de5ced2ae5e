"""The orchestrator's scenarios, each on every stack of tests/scenarios/stack.py: embedded
(in-process bus, SQLite, eager tasks, the orchestrator on threads) and full (RabbitMQ,
Postgres, a Celery worker process, the orchestrator as a process).

Scripted light clients (tests/integration/lightclient.py) speak the real wire; rounds,
participations and events are read from the database. A scenario uses only what ``Stack``
offers, so that it means the same on both stacks; what only one stack can show (a broker
restart, device processes) stays in tests/integration and tests/faults.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from db.models import ParticipationState
from orchestrator.state import RoundPolicy
from protocol import auth, chunking, topology
from protocol.messages import ClientState, CommandAction, Signal
from tests.faults.invariants import Invariants
from tests.faults.support import acked, wait_acked, wait_models, wait_ready
from tests.integration.lightclient import ENVELOPE_HEADER, LightClient
from tests.integration.orchestrator_harness import fedavg
from tests.scenarios.stack import Stack

pytestmark = [pytest.mark.scenarios, pytest.mark.slow, pytest.mark.timeout(120)]

UPDATE = ParticipationState.UPDATE


def _counted(stack: Stack, number: int) -> set[str]:
    return {p.client_id for p in stack.participations(number) if p.state == UPDATE}


def _assert_fedavg_of(stack: Stack, version: int, clients: list[LightClient], rnd: int) -> None:
    """Model ``version`` is FedAvg over the updates ``clients`` sent for round ``rnd``."""
    sent = [(u.delta, u.num_samples) for c in clients for u in c.sent if u.round == rnd]
    assert len(sent) == len(clients)
    expected = fedavg(stack.base, sent)
    got = stack.model(version)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


def _announced_version(stack: Stack, c: LightClient, rnd: int) -> int:
    stack.wait(lambda: any(a.round == rnd for a in c.announcements), 30, f"round {rnd} at {c.name}")
    version = next(a.model_version for a in c.announcements if a.round == rnd)
    wait_models(stack, [c], version)
    return version


def test_dropout_a_selected_client_that_vanishes_is_not_waited_for_past_the_deadline(
    stack: Stack,
) -> None:
    """Five selected: one leaves with a word (dropped from the expected set at once), one
    vanishes without a word (its heartbeat timeout is far away): the round closes at its
    deadline with the quorum, counting the three others and nothing of the two."""
    stack.create_run(
        RoundPolicy(min_clients=5, quorum_fraction=0.5, deadline_s=5, heartbeat_timeout_s=60)
    )
    stack.start_orchestrator()
    clients = [stack.client(f"c{i}", train_s=0.3) for i in range(5)]
    leaver, vanished, stayed = clients[3], clients[4], clients[:3]
    leaver.leave_on_round = 1
    wait_ready(stack, clients)
    vanished.silent = True  # still ready in the database when the round opens
    stack.command(CommandAction.AUTORUN, rounds=1)

    r = stack.wait_round_state(1, {"done"}, 60)
    assert r.received == 3 and r.quorum <= 3
    closed = stack.events("round.closed")
    assert closed and closed[0].detail["reason"] == "deadline"
    parts = {p.client_id: p.state for p in stack.participations(1)}
    assert len(parts) == 5  # all five were selected
    assert parts[leaver.client_id] == ParticipationState.DROPPED
    assert parts[vanished.client_id] != UPDATE
    assert _counted(stack, 1) == {c.client_id for c in stayed}
    assert stack.active_clients() == 4  # the leaver is offline; the vanished one not yet
    _assert_fedavg_of(stack, 1, stayed, 1)


def test_a_client_that_registers_mid_round_is_used_from_the_next_round(stack: Stack) -> None:
    stack.create_run(RoundPolicy(min_clients=3, quorum_fraction=1.0, deadline_s=60))
    stack.start_orchestrator()
    # They hold their round-1 updates until the late client is in, so that round 1 cannot
    # end before it registers, however slow the machine.
    early = [stack.client(f"c{i}", hold_updates=True, train_s=0.2) for i in range(3)]
    wait_ready(stack, early)
    stack.command(CommandAction.AUTORUN, rounds=2)
    stack.wait_round_state(1, {"open"}, 30)
    late = stack.client("late", train_s=0.2)
    wait_ready(stack, [late])
    assert stack.active_clients() == 4
    assert late.client_id not in {p.client_id for p in stack.participations(1)}
    for c in early:
        c.hold_updates = False
        v = _announced_version(stack, c, 1)
        c.send_update(1, v, c.models[v])

    r1 = stack.wait_round_state(1, {"done"}, 60)
    assert r1.received == 3
    r2 = stack.wait_round_state(2, {"done"}, 60)
    assert r2.received == 4
    assert late.client_id in _counted(stack, 2)
    assert late.rounds_trained() == [2]
    assert not any(c.errors for c in stack.clients)


def test_a_silent_client_is_written_off_and_the_round_goes_on_without_it(stack: Stack) -> None:
    """No heartbeat past the timeout: offline (reason ``timeout``), out of the expected set;
    the round ends once the others reported, long before its deadline. A selected client
    that heartbeats but has not reported yet is waited for, not written off."""
    stack.create_run(
        RoundPolicy(min_clients=4, quorum_fraction=0.5, deadline_s=90, heartbeat_timeout_s=2.5)
    )
    stack.start_orchestrator()
    clients = [stack.client(f"c{i}", train_s=0.3) for i in range(2)]
    slow = stack.client("slow", hold_updates=True)  # alive; its update comes when the test says
    silent = stack.client("silent", hold_updates=True)  # alive until the round is open
    wait_ready(stack, [*clients, slow, silent])
    stack.command(CommandAction.AUTORUN, rounds=1)
    stack.wait_round_state(1, {"open"}, 30)
    assert silent.client_id in {p.client_id for p in stack.participations(1)}
    silent.silent = True

    stack.wait(lambda: stack.client_state(silent.client_id or "") == "offline", 30, "offline")
    offline = [e for e in stack.events("client.offline") if e.client_id == silent.client_id]
    assert offline and offline[0].detail["reason"] == "timeout"
    stack.wait(lambda: len(_counted(stack, 1)) == 2, 30, "the two quick updates")
    r1 = stack.round(1)
    assert r1 is not None and str(r1.state) == "open"  # the slow client is still expected
    assert stack.client_state(slow.client_id or "") != "offline"
    v = _announced_version(stack, slow, 1)
    slow.send_update(1, v, slow.models[v])

    r = stack.wait_round_state(1, {"done"}, 40)
    assert r.received == 3
    closed = stack.events("round.closed")
    assert closed and closed[0].detail["reason"] == "no selected client left to wait for"
    parts = {p.client_id: p.state for p in stack.participations(1)}
    assert parts[silent.client_id] == ParticipationState.DROPPED
    _assert_fedavg_of(stack, 1, [*clients, slow], 1)
    assert all(stack.client_state(c.client_id or "") != "offline" for c in [*clients, slow])


def test_autorun_runs_the_configured_rounds_and_stop_ends_after_the_current_one(
    stack: Stack,
) -> None:
    stack.create_run(RoundPolicy(min_clients=3, quorum_fraction=1.0, deadline_s=60))
    stack.start_orchestrator()
    clients = [stack.client(f"c{i}", train_s=0.2) for i in range(3)]
    wait_ready(stack, clients)
    stack.command(CommandAction.AUTORUN, rounds=3)
    stack.wait_round_state(3, {"done"}, 90)
    stack.wait(lambda: stack.run_status() == "finished", 20, "the run to finish")
    time.sleep(2.0)  # long enough for a wrongly opened round 4 to show
    assert [(r.number, str(r.state), r.received) for r in stack.rounds()] == [
        (n, "done", 3) for n in (1, 2, 3)
    ]
    assert all(c.rounds_trained() == [1, 2, 3] for c in clients)

    # Three more, stopped while the first of them is open: that round ends, no other opens.
    for c in clients:
        c.hold_updates = True
    stack.command(CommandAction.AUTORUN, rounds=3)
    stack.wait_round_state(4, {"open"}, 30)
    stack.command(CommandAction.STOP_AUTORUN)
    stack.wait(lambda: len(stack.events("command.result")) == 3, 30, "the stop to be taken")
    for c in clients:
        v = _announced_version(stack, c, 4)
        c.send_update(4, v, c.models[v])
    stack.wait_round_state(4, {"done"}, 60)
    time.sleep(2.0)
    assert max(r.number for r in stack.rounds()) == 4
    assert all(e.detail["accepted"] for e in stack.events("command.result"))
    assert not any(c.errors for c in clients)


def test_malformed_messages_are_dead_lettered_with_a_reason_and_the_consumers_go_on(
    stack: Stack,
) -> None:
    stack.create_run(RoundPolicy(min_clients=2, quorum_fraction=1.0, deadline_s=60))
    stack.start_orchestrator()
    c, other = stack.client("c0"), stack.client("c1")
    wait_ready(stack, [c, other])
    assert c.client_id and c.token
    # 1. not a message at all, on the signals exchange
    stack.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(c.client_id), b"\xff{")
    # 2. an update whose chunk headers are fine and whose envelope is garbage
    chunk = chunking.split(b"x" * 100)[0]
    stack.publish(
        topology.UPDATES_EXCHANGE,
        topology.update_routing_key(stack.run_id, 1, c.client_id),
        chunk.data,
        {**chunking.to_headers(chunk), ENVELOPE_HEADER: "{not json"},
    )
    # 3. a signal with a MAC under a wrong token
    bad = auth.sign(
        Signal(run_id=stack.run_id, client_id=c.client_id, state=ClientState.READY),
        "wrong-token-0123456789",
    )
    stack.publish(
        topology.SIGNALS_EXCHANGE, topology.signal_routing_key(c.client_id), bad.to_json()
    )
    # 4. an update for a round that is not open (no round was opened at all)
    c.send_update(7, 0, stack.base)

    wanted = ("malformed message", "malformed update envelope", "bad MAC", "round 7 is not open")

    def reasons() -> str:
        return " | ".join(str(d["reason"]) for d in stack.dead_letters())

    stack.wait(lambda: all(w in reasons() for w in wanted), 30, f"dead letters {wanted}")
    letters = stack.dead_letters()
    assert all(str(d["queue"]).startswith("orchestrator.") for d in letters), letters
    assert stack.client_state(c.client_id) == "ready"

    # The consumers went on: a round runs with both clients.
    stack.command(CommandAction.AUTORUN, rounds=1)
    r = stack.wait_round_state(1, {"done"}, 60)
    assert r.received == 2
    _assert_fedavg_of(stack, 1, [c, other], 1)


def test_an_orchestrator_killed_mid_round_is_replaced_and_counts_each_update_once(
    stack: Stack,
) -> None:
    stack.create_run(RoundPolicy(min_clients=4, quorum_fraction=1.0, deadline_s=90))
    inv = Invariants(stack.sessions, stack.run_id)
    stack.start_orchestrator()
    # Uploads in many small chunks with pauses, so that the kill lands mid-upload.
    clients = [
        stack.client(f"c{i}", hold_updates=True, chunk_size=64, chunk_delay_s=0.08)
        for i in range(4)
    ]
    wait_ready(stack, clients)
    stack.command(CommandAction.AUTORUN, rounds=1)
    stack.wait_round_state(1, {"open"}, 30)
    wait_models(stack, clients, 0)

    def send(i: int) -> None:
        time.sleep(0.6 * i)
        clients[i].send_update(1, 0, clients[i].models[0])

    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in senders:
        t.start()
    stack.wait(lambda: len(_counted(stack, 1)) >= 1, 30, "the first update counted")
    stack.kill_orchestrator()
    assert len(_counted(stack, 1)) < 4, "every update was in before the kill"

    stack.start_orchestrator()
    for t in senders:
        t.join(timeout=30)
    r = stack.wait_round_state(1, {"done"}, 60)
    assert r.received == 4
    assert [p.state for p in stack.participations(1)] == [UPDATE] * 4
    accepted = sorted(e.client_id for e in stack.events("update.accepted"))
    assert accepted == sorted(c.client_id for c in clients)
    _assert_fedavg_of(stack, 1, clients, 1)
    wait_acked(stack, clients, 4)
    assert inv.check(acked(clients)) == 4
