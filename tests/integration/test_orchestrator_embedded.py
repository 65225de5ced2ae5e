"""Embedded mode: the same orchestrator on SQLite, the in-process bus and eager tasks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service, worker_config
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol.bus import connect
from protocol.codec import Encoding, encode
from tests.integration.lightclient import LightClient, tiny_model
from workers.app import configure
from workers.config import WorkerConfig

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(url)
    yield Settings(broker_url=f"memory://emb-{uuid.uuid4().hex[:8]}", database_url=url)
    configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


def test_two_autorun_rounds_in_embedded_mode(settings: Settings) -> None:
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as s:
        run_id = create_run(
            s, "emb", encode(tiny_model(), Encoding.FP32), policy=RoundPolicy(min_clients=2)
        )
    assert worker_config(settings).eager
    service = orchestrator_service(settings)
    service.start()
    bus = connect(settings.broker_url)
    clients = [LightClient(bus, run_id, f"c{i}").start() for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                ready = [c for c in q.list_clients(s, run_id) if c.state == "ready"]
            if len(ready) == 2:
                break
            time.sleep(0.1)
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(2), time.time())
        rounds: list[tuple[int, str, int]] = []
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                rounds = [(r.number, str(r.state), r.received) for r in q.list_rounds(s, run_id)]
            if len(rounds) == 2 and rounds[-1][1] == "done":
                break
            time.sleep(0.2)
        assert rounds == [(1, "done", 2), (2, "done", 2)]
        assert all(c.rounds_trained() == [1, 2] for c in clients)
        assert not any(c.errors for c in clients)
        with session_scope(sessions) as s:
            run = q.get_run(s, run_id)
            assert run is not None and run.status == "finished"
    finally:
        for c in clients:
            c.stop()
        service.stop()
