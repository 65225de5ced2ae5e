"""The orchestrator process killed with SIGKILL while updates arrive: a new process finishes
the round with every update that was sent, none counted twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from db.models import ParticipationState
from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.integration.orchestrator_harness import fedavg, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]


def test_sigkilled_orchestrator_is_replaced_and_the_round_counts_each_update_once(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.create_run(RoundPolicy(min_clients=4, quorum_fraction=1.0, deadline_s=60))
        first = h.procs.orchestrator("orchestrator-1")
        clients = [
            h.client(f"client_{i}", hold_updates=True, chunk_size=64, chunk_delay_s=0.08)
            for i in range(1, 5)
        ]
        h.wait(
            lambda: sum(1 for c in clients if h.client_state(c.client_id or "") == "ready") == 4,
            30,
            "4 ready clients",
        )
        h.command(CommandAction.AUTORUN, rounds=1)
        h.wait_round_state(1, {"open"}, 20)
        h.wait(lambda: all(0 in c.models for c in clients), 20, "the model at every client")

        def send(i: int) -> None:
            time.sleep(0.6 * i)
            clients[i].send_update(1, 0, clients[i].models[0])

        senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in senders:
            t.start()

        def counted() -> int:
            return sum(1 for p in h.participations(1) if p.state == ParticipationState.UPDATE)

        h.wait(lambda: counted() >= 1, 30, "the first update counted")
        h.procs.kill(first)  # SIGKILL: mid-ingest, with chunks staged and un-acked
        at_kill = counted()
        assert at_kill < 4, "every update was in before the kill"

        h.procs.orchestrator("orchestrator-2")
        for t in senders:
            t.join(timeout=30)
        r = h.wait_round_state(1, {"done"}, 60)

        assert r.received == 4
        parts = h.participations(1)
        assert [p.state for p in parts] == [ParticipationState.UPDATE] * 4
        accepted = h.events("update.accepted")
        assert sorted(e.client_id for e in accepted) == sorted(c.client_id for c in clients)
        expected = fedavg(h.base, [(c.sent[0].delta, c.num_samples) for c in clients])
        got = h.model(1)
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
