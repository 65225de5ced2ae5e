"""Issue 17, finding 1: one forged round announcement stalled a round.

Anyone who may publish on ``fedmq.devices`` (with the shared broker user: every device) put
an announcement for the next round, its deadline already past, on the devices' queues.
Each device recorded that round and attempt as seen (and skipped it: too late), then took
the real announcement for a duplicate: the round sat open with nothing received until its
deadline. Now devices verify the orchestrator's signature before they record anything, so
the forgery is dropped with its reason and the round completes on time.

Real RabbitMQ, Postgres, a Celery worker, the orchestrator service and two
``FederatedClient``s on AMQP. Run against a release without signatures, the round is still
open with nothing received when the check below gives up (it waits half the deadline).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, WireConfig
from learning.models import build_model
from learning.params import to_numpy
from learning.replica import ReplicaConfig, federation_data
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import topology
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction, RoundAnnouncement, utcnow
from protocol.signing import BROADCAST, Signer, generate_key
from tests.integration.orchestrator_harness import Harness, harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEADLINE_S = 40.0


@pytest.fixture
def h(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Harness]:
    with harness(amqp_url, pg_url, tmp_path) as hh:
        yield hh


def _forged(run_id: str, selected: list[str]) -> bytes:
    """What the attacker sent: the next round, attempt 1, its deadline already past."""
    return RoundAnnouncement(
        run_id=run_id,
        round=1,
        model_version=0,
        model_sha256="0" * 64,
        model_bytes=1,
        deadline=utcnow() - timedelta(seconds=5),
        selected=selected,
        attempt=1,
        carried=[],
    ).to_json()


def test_a_forged_announcement_changes_nothing_and_the_round_completes_on_time(
    h: Harness,
) -> None:
    data, _ = federation_data(ReplicaConfig(clients=2))
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    with h.sessions.begin() as s:
        h.run_id = create_run(
            s,
            "forged",
            encode(to_numpy(model), Encoding.FP32),
            policy=RoundPolicy(min_clients=2, deadline_s=DEADLINE_S),
            train={"epochs": 1},
        )
    h.start_service()
    buses = [connect(h.amqp_url) for _ in range(2)]
    devices = [
        FederatedClient(
            DeviceConfig(
                run_id=h.run_id,
                client_index=k,
                num_clients=2,
                wire=WireConfig(heartbeat_s=0.5, poll_s=0.05),
                training=TrainingConfig(warm_up=False),
            ),
            bus,
        )
        for k, bus in enumerate(buses)
    ]
    try:
        for d in devices:
            d.start(timeout=60)
        ids = [d.client_id or "" for d in devices]
        h.wait(lambda: all(h.client_state(c) == "ready" for c in ids), 30, "2 ready devices")

        # The attack, as it was made: on the run's broadcast key (every device's queue)
        # unsigned, and on each device's own queue signed with a key of the attacker's.
        forger = Signer(generate_key()[0])
        body = _forged(h.run_id, ids)
        h.bus.publish(topology.DEVICES_EXCHANGE, topology.broadcast_routing_key(h.run_id), body)
        for c in ids:
            h.bus.publish(
                topology.DEVICES_EXCHANGE,
                topology.device_routing_key(c),
                body,
                headers=forger.signed_headers("round", h.run_id, BROADCAST, body),
            )
        h.wait(
            lambda: all(h.bus.queue_depth(topology.device_queue(c)) == 0 for c in ids),
            15,
            "the devices to read the forgeries",
        )
        time.sleep(0.5)  # the last one read is handled

        h.command(CommandAction.AUTORUN, rounds=1)
        h.wait_round_state(1, {"open", "aggregating", "evaluating", "done"}, 30)
        opened = time.monotonic()
        # On time: every update in long before the deadline (the stalled round waited
        # for its deadline with nothing received).
        h.wait(
            lambda: (r := h.round(1)) is not None and r.received == 2,
            DEADLINE_S / 2,
            "both updates of round 1 (a forged announcement stalled it)",
        )
        assert time.monotonic() - opened < DEADLINE_S / 2
        done = h.wait_round_state(1, {"done"}, 60)
        assert done.received == 2 and done.attempt == 1
        for d in devices:
            assert d.rounds_trained == [1]
            # Each dropped both forgeries, with the reason, and acted on neither.
            assert len(d.dropped) == 2, d.dropped
            assert any(r == "unsigned round message" for r in d.dropped)
            assert any("not signed by the pinned orchestrator key" in r for r in d.dropped)
            assert [a.message_id for a in d.announcements] == [f"round-{h.run_id}-1-1"]
    finally:
        for d in devices:
            d.stop()
        for bus in buses:
            bus.close()
