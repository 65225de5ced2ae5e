"""One harness protocol, two stacks: the orchestrator scenarios run on both.

A ``Stack`` is a run seen from outside (``RunView``: light clients that register, signal
ready, heartbeat, send updates or go silent; signed operator commands; what the database
says about rounds, participations, clients and events) plus what a scenario does to the
orchestrator: start it, stop it, kill it and start it again, and raw publishes onto the
bus. Two implementations, as Flower runs one state suite over every backend:

- ``EmbeddedStack``: what ``scripts/try.sh`` (``fedmq simulate``) runs. An in-process bus
  (``memory://``), a SQLite file, tasks run eagerly, and the orchestrator built by
  ``fedmq.wiring.orchestrator_service`` running on threads of this process.
- ``FullStack``: RabbitMQ and Postgres (a vhost and a database of its own), a Celery worker
  process and ``fedmq orchestrator`` as a process, killed with SIGKILL.

Both build the orchestrator from ``Settings`` through the same wiring; only the URLs differ.
To add a stack, subclass ``Stack``, implement its three orchestrator methods and add a
factory to ``STACKS``; every scenario in tests/scenarios/test_scenarios.py then runs on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import SecretStr
from sqlalchemy.orm import Session

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from orchestrator.deadletters import DROPPED
from orchestrator.service import OrchestratorService
from protocol import topology
from protocol.bus import connect
from tests.integration.orchestrator_harness import OPERATOR_TOKEN, Procs, RunView

TASK_TIMEOUT_S = 60


@dataclass(kw_only=True)
class Stack(RunView, ABC):
    """What every scenario may do; ``kind`` names the stack in test ids and messages."""

    kind: ClassVar[str]

    @abstractmethod
    def start_orchestrator(self) -> None:
        """Start an orchestrator on this stack's bus and database (a new one each call)."""

    @abstractmethod
    def stop_orchestrator(self) -> None:
        """Stop it cleanly (SIGTERM's path: consumers stopped, leases handed back)."""

    @abstractmethod
    def kill_orchestrator(self) -> None:
        """Take it away as SIGKILL does: no shutdown, its leases left to expire."""

    def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        """A raw message, as a misbehaving or hostile publisher sends it."""
        self.bus.publish(exchange, routing_key, body, headers=headers)

    def dead_letters(self) -> list[dict[str, Any]]:
        """What the orchestrator recorded of each dead letter it drained (newest first):
        reason, original exchange, routing key and queue, size."""

        def get(s: Session) -> list[dict[str, Any]]:
            return [dict(e.detail) for e in q.list_events(s, None, kinds=[DROPPED], limit=1000)]

        return list(self.read(get))

    def run_status(self) -> str:
        return str(self.read(lambda s: (r := q.get_run(s, self.run_id)) and r.status))


# --- embedded -------------------------------------------------------------------------------


def crash(service: OrchestratorService) -> None:
    """What SIGKILL leaves of an orchestrator, inside one process.

    Its consumers stop (the in-process bus hands their un-acked messages back, as RabbitMQ
    does when a connection dies), its ticker, counter and lease renewal stop, and nothing of
    the clean shutdown happens: its leases are not handed back, so the next orchestrator
    takes the runs only once they expire (``lease_ttl_s``), as after a real kill on SQLite.
    One difference stays: a handler already inside a transaction finishes it (a thread
    cannot be killed), where a killed process's transaction is rolled back; the full stack's
    real SIGKILL covers that case.
    """
    # Private attributes, on purpose: the service has no API for dying badly.
    leases = service.leases
    for flag in (service._stop, service._kick, service._counting, leases._stop, leases._wake):
        flag.set()
    for c in service._consumers:
        c.stop()
    service._consumers.clear()
    for t in (service._ticker, service._counter, leases._thread):
        if t is not None:
            t.join(timeout=10)


@dataclass(kw_only=True)
class EmbeddedStack(Stack):
    kind: ClassVar[str] = "embedded"
    settings: Settings
    service: OrchestratorService | None = None
    abandoned: int = 0

    def start_orchestrator(self) -> None:
        assert self.service is None, "one orchestrator at a time"
        self.service = orchestrator_service(self.settings, self.bus)
        self.service.start()

    def stop_orchestrator(self) -> None:
        assert self.service is not None
        self.service.stop()
        self.service = None

    def kill_orchestrator(self) -> None:
        assert self.service is not None
        crash(self.service)
        self.service = None
        self.abandoned += 1


@contextlib.contextmanager
def embedded_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    from workers.app import configure
    from workers.config import WorkerConfig

    db_url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(db_url)
    settings = Settings(
        broker_url=f"memory://scenario-{uuid.uuid4().hex[:8]}",
        database_url=db_url,
        operator_token=SecretStr(OPERATOR_TOKEN),
        task_timeout_s=TASK_TIMEOUT_S,
    )
    assert settings.embedded
    engine = make_engine(db_url)
    bus = connect(settings.broker_url)
    topology.declare(bus)  # devices may register before the orchestrator starts
    stack = EmbeddedStack(bus=bus, sessions=make_sessionmaker(engine), settings=settings)
    try:
        yield stack
    finally:
        for c in stack.clients:
            c.stop()
        if stack.service is not None:
            stack.service.stop()
        bus.close()
        engine.dispose()
        configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


# --- full -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FullStack(Stack):
    kind: ClassVar[str] = "full"
    procs: Procs
    orchestrator: subprocess.Popen[bytes] | None = None
    started: int = 0

    def start_orchestrator(self) -> None:
        assert self.orchestrator is None, "one orchestrator at a time"
        self.orchestrator = self.procs.orchestrator(f"orchestrator-{self.started}")
        self.started += 1

    def stop_orchestrator(self) -> None:
        assert self.orchestrator is not None
        self.procs.kill(self.orchestrator, signal.SIGTERM)
        self.orchestrator = None

    def kill_orchestrator(self) -> None:
        assert self.orchestrator is not None
        self.procs.kill(self.orchestrator, signal.SIGKILL)
        self.orchestrator = None

    def diagnostics(self) -> str:
        return self.procs.output()


@contextlib.contextmanager
def full_stack(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[FullStack]:
    migrations.upgrade(pg_url)
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": amqp_url,
        "FEDMQ_DATABASE_URL": pg_url,
        "FEDMQ_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "FEDMQ_TASK_TIMEOUT_S": str(TASK_TIMEOUT_S),
    }
    env.pop("FEDMQ_RESULT_BACKEND", None)
    procs = Procs(env, tmp_path)
    engine = make_engine(pg_url)
    bus = connect(amqp_url)
    topology.declare(bus)
    stack = FullStack(bus=bus, sessions=make_sessionmaker(engine), procs=procs)
    procs.worker()
    try:
        yield stack
    finally:
        for c in stack.clients:
            c.stop()
        procs.close()
        bus.close()
        engine.dispose()


# name -> (fixtures it needs, factory taking them and tmp_path)
STACKS: dict[str, tuple[tuple[str, ...], Callable[..., contextlib.AbstractContextManager[Any]]]] = {
    "embedded": ((), embedded_stack),
    "full": (("amqp_url", "pg_url"), full_stack),
}
