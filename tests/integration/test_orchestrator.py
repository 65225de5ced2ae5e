"""The orchestrator on the real RabbitMQ and Postgres, with scripted light clients sending
real messages and a real Celery worker aggregating (issue 3's acceptance scenes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from db.models import ParticipationState
from orchestrator.state import RoundPolicy
from protocol import auth, chunking, topology
from protocol.bus import ORIGINAL_QUEUE_HEADER, REASON_HEADER
from protocol.messages import ClientState, CommandAction, Signal
from tests.integration.lightclient import ENVELOPE_HEADER
from tests.integration.orchestrator_harness import Harness, fedavg, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture
def h(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Harness]:
    with harness(amqp_url, pg_url, tmp_path) as hh:
        yield hh


def _ready(h: Harness, n: int) -> None:
    h.wait(
        lambda: (
            sum(1 for c in h.clients if c.client_id and h.client_state(c.client_id) == "ready") >= n
        ),
        20,
        f"{n} ready clients",
    )


def test_dropout_scene_round_completes_with_the_other_four(h: Harness) -> None:
    h.create_run(RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=30))
    h.start_service()
    for i in range(1, 6):
        h.client(f"client_{i}", leave_on_round=1 if i == 3 else None, train_s=1.0)
    _ready(h, 5)
    assert h.active_clients() == 5
    h.command(CommandAction.AUTORUN, rounds=1)

    done = h.wait_round_state(1, {"done"}, 60)
    assert done.received == 4
    parts = {p.client_id: p.state for p in h.participations(1)}
    leaver = h.clients[2].client_id
    assert parts[leaver] == ParticipationState.DROPPED
    assert sum(1 for s in parts.values() if s == ParticipationState.UPDATE) == 4
    assert h.active_clients() == 4
    expected = fedavg(h.base, [(c.sent[0].delta, c.num_samples) for c in h.clients if c.sent])
    got = h.model(1)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_late_join_waits_for_the_next_round(h: Harness) -> None:
    h.create_run(RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=30))
    h.start_service()
    for i in range(1, 5):
        h.client(f"client_{i}", train_s=2.0)
    _ready(h, 4)
    h.command(CommandAction.AUTORUN, rounds=2)
    h.wait_round_state(1, {"open"}, 20)
    assert h.active_clients() == 4
    late = h.client("client_5", train_s=0.5)
    h.wait(lambda: h.active_clients() == 5, 20, "the late joiner to count")
    r1 = h.wait_round_state(1, {"done"}, 60)
    assert r1.received == 4
    assert late.client_id not in {p.client_id for p in h.participations(1)}
    r2 = h.wait_round_state(2, {"done"}, 60)
    assert r2.received == 5
    assert late.rounds_trained() == [2]


def test_a_silent_client_goes_offline_and_the_round_closes_at_its_deadline(h: Harness) -> None:
    h.create_run(
        RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=6, heartbeat_timeout_s=2.5)
    )
    h.start_service()
    clients = [h.client(f"client_{i}", train_s=0.3) for i in range(1, 5)]
    _ready(h, 4)
    silent, slow = clients[2], clients[3]
    slow.hold_updates = True  # alive, never reports: only the deadline closes the round
    silent.silent = True  # still ready when the round opens; goes offline during it
    h.command(CommandAction.AUTORUN, rounds=1)
    h.wait_round_state(1, {"open"}, 20)
    assert silent.client_id in {p.client_id for p in h.participations(1)}
    h.wait(lambda: h.client_state(silent.client_id or "") == "offline", 15, "silent → offline")
    offline = [e for e in h.events("client.offline") if e.client_id == silent.client_id]
    assert offline and offline[0].detail["reason"] == "timeout"
    r = h.wait_round_state(1, {"aggregating", "evaluating", "done"}, 20)
    closed = h.events("round.closed")
    assert closed and "deadline" in str(closed[0].detail["reason"])
    assert r.received == 2 and r.quorum == 2
    h.wait_round_state(1, {"done"}, 40)
    assert h.client_state(slow.client_id or "") != "offline"


def test_autorun_three_runs_exactly_three_rounds_and_stop_ends_after_current(
    h: Harness,
) -> None:
    h.create_run(RoundPolicy(min_clients=2, quorum_fraction=0.5, deadline_s=30))
    h.start_service()
    for i in range(1, 4):
        h.client(f"client_{i}", train_s=0.2)
    _ready(h, 3)
    h.command(CommandAction.AUTORUN, rounds=3)
    h.wait_round_state(3, {"done"}, 60)
    time.sleep(2.0)  # long enough for a wrongly opened round 4 to show
    assert [r.number for r in h.rounds()] == [1, 2, 3]
    assert all(str(r.state) == "done" for r in h.rounds())

    # Stop in the middle: autorun 5, stop while round 5 (the second of them) is open.
    for c in h.clients:
        c.train_s = 1.5
    h.command(CommandAction.AUTORUN, rounds=5)
    h.wait_round_state(5, {"open"}, 40)
    h.command(CommandAction.STOP_AUTORUN)
    h.wait_round_state(5, {"done"}, 40)
    time.sleep(2.0)
    assert max(r.number for r in h.rounds()) == 5
    results = h.events("command.result")
    assert all(e.detail["accepted"] for e in results)


def test_malformed_bad_token_and_round_not_open_are_dead_lettered(h: Harness) -> None:
    h.create_run(RoundPolicy(min_clients=1, deadline_s=30))
    h.start_service()
    c = h.client("client_1", hold_updates=True)
    _ready(h, 1)
    assert c.client_id and c.token
    # 1. a malformed update: chunk headers fine, envelope garbage
    blob = b"x" * 100
    chunk = chunking.split(blob)[0]
    headers = {**chunking.to_headers(chunk), ENVELOPE_HEADER: "{not json"}
    h.bus.publish(
        topology.UPDATES_EXCHANGE,
        topology.update_routing_key(h.run_id, 1, c.client_id),
        chunk.data,
        headers=headers,
    )
    # 2. a signal with a MAC under a wrong token
    bad = auth.sign(
        Signal(run_id=h.run_id, client_id=c.client_id, state=ClientState.READY),
        "wrong-token-0123456789",
    )
    h.bus.publish(
        topology.SIGNALS_EXCHANGE, topology.signal_routing_key(c.client_id), bad.to_json()
    )
    # 3. an update for a round that is not open (no round was opened at all)
    c.send_update(7, 0, h.base)

    got: list[dict] = []

    def dead() -> bool:
        d = h.bus.get(topology.DEAD_LETTER_QUEUE, timeout=0.2)
        if d is not None:
            got.append(dict(d.headers))
            d.ack()
        reasons = " | ".join(str(g[REASON_HEADER]) for g in got)
        # Every chunk of the round-7 update is dead-lettered, and so is the client's
        # "update" signal that follows it (ready → update is not a legal move).
        return all(
            want in reasons
            for want in ("malformed update envelope", "bad MAC", "round 7 is not open")
        )

    h.wait(dead, 30, "the three kinds of dead letters")
    assert all(g[ORIGINAL_QUEUE_HEADER].startswith("orchestrator.") for g in got)
    assert ClientState.READY.value == h.client_state(c.client_id)
