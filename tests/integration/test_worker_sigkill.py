"""A real Celery worker killed with SIGKILL mid-aggregation: the task is redelivered to a
fresh worker (acks_late + reject_on_worker_lost) and exactly one model version results.

The task is slowed down in a controlled way with the test-only ``FEDMQ_TEST_AGGREGATE_DELAY_S``
(a sleep after each folded update), so the kill lands while it folds; the
``aggregate.started`` event it commits before folding tells the test when that is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import Select, func, select

from db.engine import make_engine, session_scope
from db.models import Event, ModelVersion
from tests.integration.test_aggregate_task import seed_run
from workers.app import AGGREGATE_TASK, create_app
from workers.config import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Starts ``celery worker`` processes, each in its own process group; kills them all."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, delay_s: float) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        cmd = [
            *(sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "aggregate"),
            *("--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO", "-n", f"{name}@%h"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]
        env = {**self.env, "FEDMQ_TEST_AGGREGATE_DELAY_S": str(delay_s)}
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((proc, log))
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its pool children
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            log.close()

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs.glob("*.log"))


@pytest.fixture
def workers(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    env = {**os.environ, "FEDMQ_BROKER_URL": amqp_url, "FEDMQ_DATABASE_URL": pg_url}
    env.pop("FEDMQ_RESULT_BACKEND", None)
    pool = Workers(env, tmp_path)
    yield pool
    pool.close()


def _count(url: str, stmt: Select[Any]) -> int:
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            return int(s.scalar(stmt) or 0)
    finally:
        engine.dispose()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, workers: Workers) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{workers.output()}")


def test_a_killed_worker_task_is_redelivered_and_makes_exactly_one_version(
    amqp_url: str, pg_url: str, workers: Workers
) -> None:
    seeded = seed_run(pg_url)
    started = select(func.count()).where(Event.kind == "aggregate.started")
    versions = select(func.count()).where(ModelVersion.round_id.is_not(None))
    client = create_app(WorkerConfig(database_url=pg_url, broker_url=amqp_url))
    try:
        result = client.send_task(AGGREGATE_TASK, args=[seeded.run_id, 1, 1])

        first = workers.start("first", delay_s=2.0)  # 5 updates x 2 s: ~10 s of folding
        _wait_for(lambda: _count(pg_url, started) == 1, 45, "the first worker to start", workers)
        time.sleep(0.5)  # well inside the fold
        workers.kill(first)
        assert _count(pg_url, versions) == 0, "the task finished before the kill"

        workers.start("second", delay_s=0.0)
        outcome = result.get(timeout=45)
    finally:
        client.close()

    assert outcome["created"] is True and outcome["model_version"] == 1
    assert outcome["num_updates"] == 5
    assert _count(pg_url, versions) == 1
    assert _count(pg_url, started) == 2  # redelivered: started once by each worker
