"""An outsider on the shared broker user sees no secret (issue 17, finding 3).

Whoever holds the shared user may bind a queue of their own to every exchange. Before, a
short federation gave such an observer every client's token (update chunk headers, signal
bodies, the ``Registered`` answer) and the operator token (command bodies). Now signals,
updates and commands carry an HMAC, and the token of a registration travels sealed to the
device's own key: none of the secrets, nor the MAC keys derived from them, is on the wire.

The test speaks only through the harness (light clients, ``h.command``), so the same file
shows the old behaviour when run against the code before the change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator.state import RoundPolicy
from protocol import topology
from protocol.bus import Delivery, connect
from protocol.messages import CommandAction
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OBSERVER = "eavesdrop"


def _observer_topology() -> topology.Topology:
    """One queue of the observer's own, bound to everything the shared user may read."""
    return topology.Topology(
        queues=(topology.Queue(OBSERVER, dead_letter_exchange=None),),
        bindings=(
            topology.Binding(topology.SIGNALS_EXCHANGE, OBSERVER, "#"),
            topology.Binding(topology.UPDATES_EXCHANGE, OBSERVER, "#"),
            topology.Binding(topology.DEVICES_EXCHANGE, OBSERVER, "#"),
            topology.Binding(topology.CONTROL_EXCHANGE, OBSERVER, topology.CONTROL_ROUTING_KEY),
            topology.Binding(topology.EVENTS_EXCHANGE, OBSERVER, ""),
        ),
    )


def _captured_bytes(d: Delivery) -> bytes:
    headers = repr(sorted((k, repr(v)) for k, v in d.headers.items())).encode()
    return d.body + b"\n" + headers


def test_a_shared_user_observer_sees_no_token_over_a_federation(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    with harness(amqp_url, pg_url, tmp_path) as h:
        observer = connect(amqp_url)  # the same (shared) user as every device
        try:
            observer.declare(_observer_topology())
            h.create_run(RoundPolicy(min_clients=3, quorum_fraction=1.0, deadline_s=30))
            h.start_service()
            clients = [h.client(f"dev{i}") for i in range(3)]
            h.wait(
                lambda: all(h.client_state(c.client_id or "") == "ready" for c in clients),
                30,
                "3 ready clients",
            )
            h.command(CommandAction.AUTORUN, rounds=2)
            h.wait_round_state(2, {"done"}, timeout=90)
            h.command(CommandAction.KICK, target_client=clients[0].client_id)
            h.wait(lambda: h.client_state(clients[0].client_id or "") == "offline", 20, "kick")

            for c in clients:
                c.stop()  # their heartbeats would keep the observer's queue filling
            captured: list[tuple[str, str, bytes]] = []
            while (d := observer.get(OBSERVER, timeout=2.0)) is not None:
                captured.append((d.exchange, d.routing_key, _captured_bytes(d)))
                d.ack()
        finally:
            observer.delete_queue(OBSERVER)
            observer.close()

    seen = {exchange for exchange, _, _ in captured}
    # The observer did see the traffic: every kind that used to carry a secret.
    assert {
        topology.SIGNALS_EXCHANGE,
        topology.UPDATES_EXCHANGE,
        topology.DEVICES_EXCHANGE,
        topology.CONTROL_EXCHANGE,
    } <= seen, seen
    everything = b"\n".join(data for _, _, data in captured)
    assert b'"type":"registered"' in everything
    assert b"x-fedmq-envelope" in everything
    assert b'"type":"command"' in everything
    secrets = {f"{c.name}'s token": c.token for c in clients}
    secrets["the operator token"] = OPERATOR_TOKEN
    leaked = []
    for what, secret in secrets.items():
        assert secret
        # The secret itself, and its SHA-256 (the MAC key: it would let one forge messages).
        for form in (secret, hashlib.sha256(secret.encode()).hexdigest()):
            hits = [(x, k) for x, k, data in captured if form.encode() in data]
            if hits:
                leaked.append(f"{what} in {len(hits)} messages, e.g. {hits[0]}")
    print(f"captured {len(captured)} messages on {sorted(seen)}; leaked: {leaked}")
    assert not leaked, leaked
