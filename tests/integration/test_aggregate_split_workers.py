"""Hierarchical aggregation on real Celery worker processes (RabbitMQ, Postgres, the database
result backend): two workers fold a round's parts in parallel, and a worker killed with
SIGKILL while it folds a part has that part redelivered and re-run, the round still
ending in exactly one model version.

The parts are slowed down with the test-only ``FEDMQ_TEST_AGGREGATE_DELAY_S`` (a sleep
after each folded update), so that both workers hold a part at once and the kill lands
mid-part; the ``aggregate.partial_started`` events (with the pool process's pid) say
who folds what.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from db import queries as q
from db.engine import make_engine, session_scope
from db.models import Event, ModelVersion
from learning.strategies import WeightedMean, make_strategy
from protocol.codec import decode
from tests.integration.test_aggregate_split import SplitRun, seed
from tests.integration.test_aggregate_task import count, model_of
from tests.integration.test_worker_sigkill import Workers, _wait_for
from workers.app import AGGREGATE_TASK, create_app
from workers.config import WorkerConfig
from workers.tasks.plan import PARTIAL_STARTED

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

K = 12
SPLIT = {"split_threshold": 4, "parts": 2}  # parts of 6 updates


@pytest.fixture
def workers(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    env = {**os.environ, "FEDMQ_BROKER_URL": amqp_url, "FEDMQ_DATABASE_URL": pg_url}
    env.pop("FEDMQ_RESULT_BACKEND", None)
    pool = Workers(env, tmp_path)
    yield pool
    pool.close()


def _ready(workers: Workers, *names: str) -> None:
    """Wait until each worker has connected and says it is ready (so that both are
    consuming before the round is sent, and each takes one part)."""

    def all_ready() -> bool:
        return all(
            (workers.logs / f"{n}.log").exists()
            and " ready." in (workers.logs / f"{n}.log").read_text(errors="replace")
            for n in names
        )

    _wait_for(all_ready, 90, f"workers {names} to be ready", workers)


def _partial_starts(url: str, run_id: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    with session_scope(engine) as s:
        events = q.list_events(s, run_id, kinds=[PARTIAL_STARTED])
        details = [dict(e.detail) for e in reversed(events)]
    engine.dispose()
    return details


def _send(amqp_url: str, pg_url: str, run: SplitRun, timeout: float) -> dict[str, Any]:
    client = create_app(WorkerConfig(database_url=pg_url, broker_url=amqp_url))
    try:
        return dict(client.send_task(AGGREGATE_TASK, args=[run.run_id, 1, 1]).get(timeout=timeout))
    finally:
        client.close()


def _assert_fedavg(run: SplitRun) -> None:
    """The stored model is the flat fold's FedAvg step to one float32 ulp."""
    mv, got = model_of(run.url, run.run_id, 1)
    acc = WeightedMean()
    floats = {n: v for n, v in run.base.items() if v.dtype == np.float32}
    for blob, n in zip(run.blobs, run.counts, strict=True):
        acc.add({k: v for k, v in decode(blob).tensors.items() if k in floats}, n)
    want, _ = make_strategy("fedavg").step(floats, acc.result(), {})
    for name, value in want.items():
        np.testing.assert_array_max_ulp(got[name], value, maxulp=1)
    assert (mv.metrics["fold"], mv.metrics["parts"]) == ("hierarchical", 2)
    assert mv.metrics["part_updates"] == [K // 2, K // 2]


def test_two_worker_processes_fold_the_parts_of_one_round(
    amqp_url: str, pg_url: str, workers: Workers
) -> None:
    run = seed(pg_url, "two-workers", K, aggregation=SPLIT)
    workers.start("one", delay_s=0.5)  # 6 updates x 0.5 s a part: both hold one at once
    workers.start("two", delay_s=0.5)
    _ready(workers, "one", "two")

    outcome = _send(amqp_url, pg_url, run, timeout=150)

    assert (outcome["created"], outcome["model_version"], outcome["num_updates"]) == (True, 1, K)
    starts = _partial_starts(pg_url, run.run_id)
    assert sorted(s["part"] for s in starts) == [0, 1]
    assert len({s["pid"] for s in starts}) == 2, starts  # two processes, one part each
    versions = select(func.count()).where(ModelVersion.round_id.is_not(None))
    assert count(pg_url, versions) == 1
    _assert_fedavg(run)


def test_a_killed_part_is_rerun_and_the_round_makes_exactly_one_version(
    amqp_url: str, pg_url: str, workers: Workers
) -> None:
    run = seed(pg_url, "killed-part", K, aggregation=SPLIT)
    procs = {
        "victim": workers.start("victim", delay_s=2.0),  # 6 updates x 2 s: ~12 s a part
        "survivor": workers.start("survivor", delay_s=2.0),
    }
    _ready(workers, "victim", "survivor")
    client = create_app(WorkerConfig(database_url=pg_url, broker_url=amqp_url))
    try:
        result = client.send_task(AGGREGATE_TASK, args=[run.run_id, 1, 1])
        _wait_for(lambda: len(_partial_starts(pg_url, run.run_id)) == 2, 90,
                  "both parts to start", workers)  # fmt: skip
        time.sleep(0.5)  # well inside both parts
        victim = procs["victim"]
        lost = [
            s for s in _partial_starts(pg_url, run.run_id) if os.getpgid(s["pid"]) == victim.pid
        ]
        assert len(lost) == 1, "the victim folds no part"
        workers.kill(victim)  # the worker and its pool process: the part's message is requeued
        versions = select(func.count()).where(ModelVersion.round_id.is_not(None))
        assert count(pg_url, versions) == 0, "the round finished before the kill"
        outcome = result.get(timeout=150)
    finally:
        client.close()

    assert (outcome["created"], outcome["model_version"], outcome["num_updates"]) == (True, 1, K)
    assert count(pg_url, versions) == 1
    starts = _partial_starts(pg_url, run.run_id)
    rerun = [s for s in starts if s["part"] == lost[0]["part"]]
    assert len(rerun) == 2 and rerun[1]["pid"] != lost[0]["pid"]  # redelivered elsewhere
    assert len(starts) == 3
    assert count(pg_url, select(func.count()).where(Event.kind == "aggregate.done")) == 1
    _assert_fedavg(run)
