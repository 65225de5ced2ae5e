"""Prometheus metrics of a live federation: the orchestrator and a Celery worker as
processes on RabbitMQ and Postgres serve /metrics, and what they count is what the database
holds. The gateway serves its own at /metrics on its port."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from db import migrations
from db.engine import make_engine, make_sessionmaker
from db.models import Participation, ParticipationState
from gateway.app import create_app
from gateway.config import GatewayConfig
from orchestrator.state import RoundPolicy
from protocol import topology
from protocol.bus import connect
from protocol.messages import CommandAction
from protocol.tasks import AGGREGATE_TASK, EVALUATE_TASK
from tests.faults.support import wait_ready
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Procs
from tests.net import free_port
from tests.scenarios.stack import FullStack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(port: int, ok: Callable[[Samples], bool], timeout: float = 60) -> Samples:
    """Scrapes until ``ok`` (a counter moves after the transaction that a database read
    already sees has committed, so the two are compared once both settled)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = scrape(port)
            if ok(samples) or time.monotonic() > deadline:
                return samples
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@contextlib.contextmanager
def metered_stack(
    amqp_url: str, pg_url: str, tmp_path: Path, ports: tuple[int, int]
) -> Iterator[FullStack]:
    migrations.upgrade(pg_url)
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "FEDMQ_TASK_TIMEOUT_S": "60",
    }
    env.pop("FEDMQ_RESULT_BACKEND", None)
    procs = Procs(env, tmp_path)
    engine = make_engine(pg_url)
    bus = connect(amqp_url)
    topology.declare(bus)
    stack = FullStack(bus=bus, sessions=make_sessionmaker(engine), procs=procs)
    procs.worker(env={"FEDMQ_METRICS_PORT": str(ports[1])})
    stack.orchestrator = procs.orchestrator(env={"FEDMQ_METRICS_PORT": str(ports[0])})
    try:
        yield stack
    finally:
        for c in stack.clients:
            c.stop()
        procs.close()
        bus.close()
        engine.dispose()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_live_federations_counters_match_its_database(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    orchestrator_port, worker_port = free_port(), free_port()
    with metered_stack(amqp_url, pg_url, tmp_path, (orchestrator_port, worker_port)) as stack:
        stack.create_run(RoundPolicy(min_clients=3, deadline_s=60, heartbeat_timeout_s=60))
        clients = [stack.client(f"c{i}") for i in range(3)]
        wait_ready(stack, clients)
        stack.command(CommandAction.AUTORUN, rounds=2)
        stack.wait_round_state(2, {"done"}, 120)
        # A message no handler can read: refused with a reason and dead-lettered.
        stack.bus.publish(topology.SIGNALS_EXCHANGE, "signal.x", b"{not json", message_id="bad-1")

        def counted(s: Session) -> list[Participation]:
            return [p for p in s.query(Participation).all() if p.state == ParticipationState.UPDATE]

        parts = stack.read(counted)
        assert len(parts) == 6
        up_bytes = sum(p.bytes or 0 for p in parts)

        o = eventually(
            orchestrator_port,
            lambda m: (
                value(m, "fedmq_orchestrator_rounds_ended_total", outcome="done") >= 2
                and value(
                    m,
                    "fedmq_orchestrator_messages_total",
                    queue=topology.SIGNALS_QUEUE,
                    outcome="reject",
                )
                >= 1
            ),
        )
        assert value(o, "fedmq_orchestrator_updates_total", outcome="counted") == len(parts)
        assert value(o, "fedmq_orchestrator_updates_total", outcome="refused") == 0
        assert value(o, "fedmq_orchestrator_update_bytes_total") == up_bytes
        assert value(o, "fedmq_orchestrator_rounds_ended_total", outcome="done") == 2
        assert value(o, "fedmq_orchestrator_round_seconds_count") == 2
        acked = value(
            o, "fedmq_orchestrator_messages_total", queue=topology.UPDATES_QUEUE, outcome="ack"
        )
        assert acked >= len(parts)  # one chunk each here; a re-delivery is acked too
        assert (
            value(
                o,
                "fedmq_orchestrator_messages_total",
                queue=topology.SIGNALS_QUEUE,
                outcome="reject",
            )
            == 1
        )
        assert value(o, "fedmq_orchestrator_batch_size_count", queue=topology.UPDATES_QUEUE) >= 1
        # Two broadcasts (rounds 1 and 2), each the global model once.
        assert value(o, "fedmq_orchestrator_model_bytes_published_total") > 0
        # The state gauges, read from the database at the scrape.
        assert value(o, "fedmq_database_up") == 1
        assert value(o, "fedmq_rounds", state="done") == 2
        assert sum(v for (n, _), v in o.items() if n == "fedmq_devices") == 3
        assert sum(v for (n, _), v in o.items() if n == "fedmq_runs") == 1

        w = eventually(
            worker_port,
            lambda m: (
                value(m, "fedmq_worker_tasks_total", task=EVALUATE_TASK, outcome="success") >= 2
            ),
        )
        assert value(w, "fedmq_worker_tasks_total", task=AGGREGATE_TASK, outcome="success") == 2
        assert value(w, "fedmq_worker_tasks_total", task=EVALUATE_TASK, outcome="success") == 2
        assert value(w, "fedmq_worker_task_seconds_count", task=AGGREGATE_TASK) == 2


def test_the_gateway_serves_its_request_metrics_when_metrics_are_on(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    sessions = make_sessionmaker(engine)
    bus = connect("memory://")
    try:
        on = TestClient(create_app(GatewayConfig(operator_token=None, metrics=True), bus, sessions))
        assert on.get("/openapi.json").status_code == 200
        text = on.get("/metrics").text
        requests = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "http_requests_total" and s.labels.get("handler") == "/openapi.json"
        ]
        assert requests and requests[0].value == 1
        off = TestClient(create_app(GatewayConfig(operator_token=None), bus, sessions))
        assert off.get("/metrics").status_code == 404
    finally:
        bus.close()
        engine.dispose()
