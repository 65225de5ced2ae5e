"""Shared pieces of the orchestrator's integration tests: a run, a worker, an orchestrator,
light clients, and polling helpers over the database."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ClientState, Participation, Round
from orchestrator.accounts import BrokerAccounts
from orchestrator.runs import create_run
from orchestrator.service import OrchestratorService, ServiceConfig
from orchestrator.state import RoundPolicy
from orchestrator.tasks import CeleryTaskRunner, result_backend_url
from protocol import auth, topology
from protocol.bus import Bus, connect
from protocol.codec import Encoding, decode, encode
from protocol.messages import Command, CommandAction
from tests.integration.lightclient import LightClient, tiny_model

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_TOKEN = "operator-token-for-tests"


@dataclass
class Procs:
    """Subprocesses, each in its own process group; all killed at teardown."""

    env: dict[str, str]
    logs: Path
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``python *args`` with the harness's environment, updated with ``env``."""
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((proc, log))
        return proc

    def worker(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(
            "worker",
            *("-m", "celery", "-A", "workers.app", "worker", "-Q", "aggregate,evaluate"),
            *("--concurrency", "1", "--pool", "solo", "--loglevel", "INFO"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            env=env,
        )

    def orchestrator(
        self, name: str = "orchestrator", env: dict[str, str] | None = None, *args: str
    ) -> subprocess.Popen[bytes]:
        """``fedmq orchestrator *args`` (a replica among others, with ``--replica-id``)."""
        return self.start(name, "-m", "fedmq.cli", "orchestrator", *args, env=env)

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=15)

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            log.close()

    def output(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
            for p in sorted(self.logs.glob("*.log"))
        )


@dataclass
class RunView:
    """One run seen from outside the orchestrator: light clients and operator commands on
    the bus, and what the database says. Whatever runs the orchestrator (this file's
    ``Harness``, the scenario stacks in tests/scenarios/stack.py) builds on it."""

    bus: Bus
    sessions: sessionmaker[Session]
    run_id: str = ""
    base: dict[str, np.ndarray] = field(default_factory=dict)
    clients: list[LightClient] = field(default_factory=list)

    def create_run(self, policy: RoundPolicy, name: str = "test") -> str:
        self.base = tiny_model()
        with session_scope(self.sessions) as s:
            self.run_id = create_run(
                s, name, encode(self.base, Encoding.FP32), policy=policy, train={"epochs": 1}
            )
        return self.run_id

    def diagnostics(self) -> str:
        """What a timed-out wait prints after the clients' errors (process logs)."""
        return ""

    def client(self, name: str, **kw: Any) -> LightClient:
        c = LightClient(self.bus, self.run_id, name, **kw)
        self.clients.append(c)
        return c.start()

    def command(self, action: CommandAction, **kw: Any) -> Command:
        cmd = auth.sign(Command(run_id=self.run_id, action=action, **kw), OPERATOR_TOKEN)
        self.bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())
        return cmd

    # --- reading the database -----------------------------------------------------------

    def read(self, fn: Callable[[Session], Any]) -> Any:
        with session_scope(self.sessions) as s:
            return fn(s)

    def rounds(self) -> list[Round]:
        def get(s: Session) -> list[Round]:
            rows = q.list_rounds(s, self.run_id)
            for r in rows:
                s.expunge(r)
            return rows

        return list(self.read(get))

    def round(self, number: int) -> Round | None:
        return next((r for r in self.rounds() if r.number == number), None)

    def participations(self, number: int) -> list[Participation]:
        def get(s: Session) -> list[Participation]:
            r = q.get_round(s, self.run_id, number)
            rows = [] if r is None else q.list_participations(s, r.id)
            for p in rows:
                s.expunge(p)
            return rows

        return list(self.read(get))

    def active_clients(self) -> int:
        def get(s: Session) -> int:
            counts = q.count_clients_by_state(s, self.run_id)
            return sum(n for st, n in counts.items() if st != ClientState.OFFLINE)

        return int(self.read(get))

    def client_state(self, client_id: str) -> ClientState | None:
        return self.read(lambda s: (c := q.get_client(s, client_id)) and c.state)

    def events(self, kind: str) -> list[Any]:
        def get(s: Session) -> list[Any]:
            rows = q.list_events(s, self.run_id, kinds=[kind], limit=1000)
            for e in rows:
                s.expunge(e)
            return rows

        return list(self.read(get))

    def model(self, version: int) -> dict[str, np.ndarray]:
        def get(s: Session) -> dict[str, np.ndarray]:
            mv = q.get_model_version(s, self.run_id, version)
            assert mv is not None
            return decode(blobstore.get(s, mv.blob_sha)).tensors

        return dict(self.read(get))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        errors = {c.name: c.errors for c in self.clients if c.errors}
        pytest.fail(f"timed out waiting for {what}; client errors {errors}\n{self.diagnostics()}")

    def wait_round_state(self, number: int, states: set[str], timeout: float = 40) -> Round:
        self.wait(
            lambda: (r := self.round(number)) is not None and str(r.state) in states,
            timeout,
            f"round {number} in {states}",
        )
        r = self.round(number)
        assert r is not None
        return r


@dataclass(kw_only=True)
class Harness(RunView):
    """A run on real RabbitMQ and Postgres, with subprocesses (a worker, orchestrators) or
    an orchestrator in this process (``start_service``)."""

    amqp_url: str
    db_url: str
    procs: Procs
    service: OrchestratorService | None = None

    def start_service(self, accounts: BrokerAccounts | None = None) -> OrchestratorService:
        tasks = CeleryTaskRunner(self.amqp_url, result_backend_url(self.db_url))
        # dead-letters left unread: tests read what was dead-lettered from it.
        config = ServiceConfig(
            operator_token=OPERATOR_TOKEN,
            tick_s=0.3,
            task_timeout_s=60,
            consume_dead_letters=False,
        )
        self.service = OrchestratorService(
            self.bus, self.sessions, tasks, config, accounts=accounts
        )
        self.service.start()
        return self.service

    def diagnostics(self) -> str:
        return self.procs.output()


def fedavg(base: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], int]]) -> dict:
    total = sum(n for _, n in updates)
    return {
        k: (
            base[k].astype(np.float64)
            + sum(d[k].astype(np.float64) * n for d, n in updates) / total
        )
        for k in base
    }


@contextlib.contextmanager
def harness(
    amqp_url: str, pg_url: str, tmp_path: Path, *, worker: bool = True
) -> Iterator[Harness]:
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
    h = Harness(
        bus=bus, sessions=make_sessionmaker(engine), amqp_url=amqp_url, db_url=pg_url, procs=procs
    )
    if worker:
        procs.worker()
    try:
        yield h
    finally:
        for c in h.clients:
            c.stop()
        if h.service is not None:
            h.service.stop()
        procs.close()
        bus.close()
        engine.dispose()
