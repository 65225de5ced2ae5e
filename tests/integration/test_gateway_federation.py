"""A mixed federation on RabbitMQ and Postgres: two AMQP devices and two HTTP devices (one a
``fedmq device --transport http`` process) share three autorun rounds, with the orchestrator,
a Celery worker and ``fedmq gateway`` as processes. Every round aggregates all four, and the
global model's accuracy rises."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from db import queries as q
from db.engine import session_scope
from db.models import ClientState
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction
from tests.integration.gateway_env import amqp_and_http_clients
from tests.integration.orchestrator_harness import Harness, harness
from tests.net import free_port, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

K, ROUNDS = 4, 3


def _ready(h: Harness) -> int:
    return int(h.read(lambda s: len(q.list_clients(s, h.run_id, ClientState.READY))))


def test_two_amqp_and_two_http_devices_share_every_round(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    with harness(amqp_url, pg_url, tmp_path) as h:
        with session_scope(h.sessions) as s:
            run_id = create_run(
                s,
                f"mixed-{uuid.uuid4().hex[:6]}",
                encode(to_numpy(model), Encoding.FP32),
                policy=RoundPolicy(min_clients=K, quorum_fraction=1.0, deadline_s=60),
                extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
            )
        h.run_id = run_id
        h.procs.orchestrator()
        h.procs.start("gateway", "-m", "fedmq.cli", "gateway", "--port", str(port))
        h.procs.start(
            "device-http-3",
            *("-m", "fedmq.cli", "device", "--run", run_id, "--index", "3"),
            *("--clients", str(K), "--transport", "http", "--gateway", gateway),
            *("--rounds", str(ROUNDS)),
        )
        wait_http(f"{gateway}/openapi.json")

        bus, clients = amqp_and_http_clients(run_id, K, amqp_url, gateway)
        try:
            for c in clients:
                c.start(timeout=60)
            h.wait(lambda: _ready(h) == K, 90, "four ready clients")
            h.command(CommandAction.AUTORUN, rounds=ROUNDS)
            h.wait(
                lambda: sum(r.state == "done" for r in h.rounds()) == ROUNDS,
                120,
                f"{ROUNDS} rounds to be done",
            )
            rounds = h.rounds()
            assert [(r.number, r.received, r.attempt) for r in rounds] == [
                (n, K, 1) for n in range(1, ROUNDS + 1)
            ], h.procs.output()
            accuracy = [float(r.metrics["accuracy"]) for r in rounds]
            print(f"mixed federation accuracy per round: {accuracy}")
            assert accuracy[-1] > accuracy[0], accuracy
            for c in clients:
                assert c.rounds_trained == [1, 2, 3], (c.config.name, c.errors)
            assert h.events("update.refused") == []
            names = h.read(lambda s: sorted(c.display_name for c in q.list_clients(s, run_id)))
            assert names == [f"device-{k}" for k in range(K)]
        finally:
            for c in clients:
                c.stop()
            bus.close()
