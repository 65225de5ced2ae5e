"""The aggregate and evaluate tasks, run eagerly against a real Postgres."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import BlobKind, Event, ModelVersion
from learning.strategies import make_strategy
from protocol.codec import Encoding, decode, encode
from workers import app as worker_app
from workers.app import AGGREGATE_TASK
from workers.config import WorkerConfig
from workers.tasks import AggregationError, aggregate_round
from workers.tasks.common import dispose_all
from workers.tasks.evaluate import register_dataset

pytestmark = pytest.mark.integration

SHAPES = {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (3, 16), "fc2.bias": (3,)}
COUNTS = [10, 250, 37, 4, 99]  # unequal sample counts


@dataclass
class Seeded:
    url: str
    run_id: str
    base: dict[str, np.ndarray]
    blobs: list[bytes]
    counts: list[int]


def make_base(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    tensors["steps"] = np.array(7, dtype=np.int64)
    return tensors


def client_blobs(base: Mapping[str, np.ndarray], version: int, seed: int, k: int) -> list[bytes]:
    """bf16 deltas against ``base`` (model version ``version``) from k clients."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(k):
        client = {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
                  for n, v in base.items() if v.dtype == np.float32}  # fmt: skip
        client["steps"] = np.array(7 + i, dtype=np.int64)
        blobs.append(encode(client, Encoding.BF16, base=base, base_version=str(version)))
    return blobs


def add_round(
    url: str, run_id: str, number: int, base_version: int, blobs: list[bytes], counts: list[int]
) -> None:
    engine = make_engine(url)
    with session_scope(engine) as s:
        base_mv = q.get_model_version(s, run_id, base_version)
        assert base_mv is not None
        clients = [
            q.register_client(s, run_id, f"dev-{number}-{i}", q.hash_token(f"t-{number}-{i}"))
            for i in range(len(blobs))
        ]
        rnd = q.create_round(
            s, run_id, number, quorum=len(blobs), selected=clients, base_version_id=base_mv.id
        )
        for client, blob, n in zip(clients, blobs, counts, strict=True):
            sha = blobstore.put(s, blob, BlobKind.UPDATE)
            q.record_update(s, rnd.id, client, update_sha=sha, num_samples=n, nbytes=len(blob))
    engine.dispose()


def seed_run(url: str, strategy: Mapping[str, Any] | None = None, **config: Any) -> Seeded:
    """A run with model version 0 and round 1 holding five bf16 delta updates."""
    migrations.upgrade(url)
    base = make_base()
    engine = make_engine(url)
    with session_scope(engine) as s:
        run = q.create_run(s, "agg", {"strategy": dict(strategy or {"name": "fedavg"}), **config})
        sha = blobstore.put(s, encode(base, Encoding.FP32), BlobKind.MODEL)
        q.create_model_version(s, run.id, sha)
        run_id = run.id
    engine.dispose()
    blobs = client_blobs(base, 0, seed=1, k=len(COUNTS))
    add_round(url, run_id, 1, 0, blobs, COUNTS)
    return Seeded(url, run_id, base, blobs, list(COUNTS))


def model_of(url: str, run_id: str, version: int) -> tuple[ModelVersion, dict[str, np.ndarray]]:
    engine = make_engine(url)
    with session_scope(engine) as s:
        mv = q.get_model_version(s, run_id, version)
        assert mv is not None
        tensors = decode(blobstore.get(s, mv.blob_sha)).tensors
    engine.dispose()
    return mv, tensors


def count(url: str, stmt: Any) -> int:
    engine = make_engine(url)
    with session_scope(engine) as s:
        n = int(s.scalar(stmt) or 0)
    engine.dispose()
    return n


@pytest.fixture
def configured(pg_url: str) -> Iterator[WorkerConfig]:
    config = WorkerConfig(database_url=pg_url)
    worker_app.configure(config)
    yield config
    worker_app.configure(WorkerConfig.from_env())
    dispose_all()


def test_aggregate_task_gives_fedavg_of_the_decoded_updates_and_runs_once(
    configured: WorkerConfig,
) -> None:
    seeded = seed_run(configured.database_url)
    first = worker_app.aggregate.apply(args=(seeded.run_id, 1, 1)).get()
    assert first["created"] is True
    assert first["model_version"] == 1
    assert (first["num_updates"], first["num_samples"]) == (5, sum(COUNTS))

    mv, new = model_of(seeded.url, seeded.run_id, 1)
    assert mv.blob_sha == first["blob_sha256"]
    deltas = [decode(b).tensors for b in seeded.blobs]  # bf16-rounded, as the worker saw them
    n = float(sum(COUNTS))
    for name in SHAPES:
        want = seeded.base[name].astype(np.float64) + sum(
            c / n * d[name].astype(np.float64) for c, d in zip(COUNTS, deltas, strict=True)
        )
        assert new[name].dtype == np.float32
        ulp = np.spacing(np.abs(want).astype(np.float32))
        assert np.all(np.abs(new[name] - want) <= ulp), name
    assert new["steps"] == 7 + 4  # counters: the largest value sent

    again = worker_app.aggregate.apply(args=(seeded.run_id, 1, 1)).get()
    assert again == {**first, "created": False}
    assert count(seeded.url, select(func.count()).select_from(ModelVersion)) == 2  # v0 and v1
    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rnd = q.get_round(s, seeded.run_id, 1)
        assert rnd is not None and rnd.model_version_id == mv.id
        kinds = [e.kind for e in q.list_events(s, seeded.run_id)]
    engine.dispose()
    assert kinds.count("aggregate.started") == 1 and kinds.count("aggregate.done") == 1


def test_two_racing_runs_of_one_round_store_one_version(configured: WorkerConfig) -> None:
    seeded = seed_run(configured.database_url)
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(aggregate_round(configured, seeded.run_id, 1, 1))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    assert {r["model_version"] for r in results} == {1}
    assert {r["blob_sha256"] for r in results} == {results[0]["blob_sha256"]}
    stmt = select(func.count()).select_from(ModelVersion).where(ModelVersion.version == 1)
    assert count(seeded.url, stmt) == 1


def test_server_state_persists_between_rounds(configured: WorkerConfig) -> None:
    params = {"name": "fedadam", "eta": 0.05, "tau": 1e-3}
    seeded = seed_run(configured.database_url, strategy=params)
    worker_app.aggregate.apply(args=(seeded.run_id, 1, 1)).get()
    mv1, w1 = model_of(seeded.url, seeded.run_id, 1)
    assert mv1.metrics["server_state"]["strategy"] == "fedadam"
    blobs2 = client_blobs(w1, 1, seed=2, k=3)
    add_round(seeded.url, seeded.run_id, 2, 1, blobs2, [5, 6, 7])
    worker_app.aggregate.apply(args=(seeded.run_id, 2, 1)).get()
    _, w2 = model_of(seeded.url, seeded.run_id, 2)

    # The same two rounds in memory, state handed from one step to the next.
    strategy = make_strategy(**params)
    floats = {k: v for k, v in seeded.base.items() if k in SHAPES}
    state: dict[str, np.ndarray] = {}
    for blobs, counts in ((seeded.blobs, COUNTS), (blobs2, [5, 6, 7])):
        acc = strategy.accumulator(len(blobs))
        for blob, c in zip(blobs, counts, strict=True):
            acc.add({k: v for k, v in decode(blob).tensors.items() if k in SHAPES}, c)
        floats, state = strategy.step(floats, acc.result(), state)
    for name in SHAPES:
        np.testing.assert_allclose(w2[name], floats[name], rtol=1e-6, atol=1e-7)


def test_unusable_updates_are_skipped_and_recorded(configured: WorkerConfig) -> None:
    seeded = seed_run(configured.database_url)
    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        rnd = q.get_round(s, seeded.run_id, 1)
        assert rnd is not None
        bad = q.received_updates(s, rnd.id)[0]
        bad_client = bad.client_id
        bad.update_sha = blobstore.put(s, b"not a tensor blob", BlobKind.UPDATE)
    result = worker_app.aggregate.apply(args=(seeded.run_id, 1, 1)).get()
    assert result["num_updates"] == 4
    with session_scope(engine) as s:
        mv = q.get_model_version(s, seeded.run_id, 1)
        assert mv is not None and bad_client in mv.metrics["skipped"]
        skipped = q.list_events(s, seeded.run_id, kinds=["aggregate.update_skipped"])
        assert [e.client_id for e in skipped] == [bad_client]
    engine.dispose()


def test_aggregate_refuses_what_a_retry_cannot_fix(configured: WorkerConfig) -> None:
    seeded = seed_run(configured.database_url, strategy={"name": "fedmedian"})
    with pytest.raises(AggregationError, match="stale task: round 1 is at attempt 1, not 2"):
        worker_app.aggregate.apply(args=(seeded.run_id, 1, 2)).get()
    with pytest.raises(AggregationError, match="has no round 9"):
        worker_app.aggregate.apply(args=(seeded.run_id, 9, 1)).get()
    tight = WorkerConfig(database_url=seeded.url, max_aggregation_bytes=1024)
    with pytest.raises(AggregationError, match=r"fedmedian needs .* over the cap"):
        aggregate_round(tight, seeded.run_id, 1, 1)
    failed = count(seeded.url, select(func.count()).where(Event.kind == "aggregate.failed"))
    assert failed == 3


def test_embedded_mode_runs_the_task_eagerly_by_name_on_sqlite(sqlite_url: str) -> None:
    worker_app.configure(WorkerConfig(database_url=sqlite_url))  # memory:// broker: eager
    try:
        seeded = seed_run(sqlite_url)
        signature = worker_app.app.signature(AGGREGATE_TASK, args=(seeded.run_id, 1, 1))
        out = signature.apply_async().get()
        assert (out["created"], out["model_version"], out["num_updates"]) == (True, 1, 5)
        again = signature.apply_async().get()
        assert again == {**out, "created": False}
    finally:
        worker_app.configure(WorkerConfig.from_env())
        dispose_all()


def _blobs_test_set(params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(int(params.get("seed", 0)))
    return rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 3, 40)


def test_evaluate_stores_loss_and_accuracy_or_says_why_it_skipped(
    configured: WorkerConfig,
) -> None:
    register_dataset("test-blobs", _blobs_test_set)
    seeded = seed_run(configured.database_url, model="mlp", dataset={"name": "test-blobs"})
    worker_app.aggregate.apply(args=(seeded.run_id, 1, 1)).get()
    out = worker_app.evaluate.apply(args=(seeded.run_id, 1, 1)).get()
    assert set(out) == {"model_version", "loss", "accuracy", "num_samples"}
    assert out["loss"] > 0 and 0 <= out["accuracy"] <= 1 and out["num_samples"] == 40
    engine = make_engine(seeded.url)
    with session_scope(engine) as s:
        mv = q.get_model_version(s, seeded.run_id, 1)
        rnd = q.get_round(s, seeded.run_id, 1)
        assert mv is not None and rnd is not None
        assert mv.metrics["loss"] == out["loss"] and mv.metrics["num_updates"] == 5
        assert rnd.metrics["accuracy"] == out["accuracy"]
        q.get_run(s, seeded.run_id).config = {"model": "resnet18"}  # type: ignore[union-attr]
    engine.dispose()
    skipped = worker_app.evaluate.apply(args=(seeded.run_id, 1, 1)).get()
    assert skipped == {"model_version": 1, "skipped": "no evaluator for model 'resnet18'"}


def test_celery_config_is_json_only_acks_late_and_routes_by_queue() -> None:
    config = WorkerConfig(database_url="postgresql://u@h/db", broker_url="amqp://x")
    conf = worker_app.celery_config(config)
    assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["result_backend"] == "db+postgresql+psycopg://u@h/db"
    assert conf["task_routes"]["fedmq.aggregate"] == {"queue": "aggregate"}
    assert conf["task_routes"]["fedmq.evaluate"] == {"queue": "evaluate"}
    assert conf["task_always_eager"] is False
    env = {"FEDMQ_BROKER_URL": "amqp://x", "FEDMQ_TEST_AGGREGATE_DELAY_S": "1.5"}
    config = WorkerConfig.from_env(env)
    assert (config.broker_url, config.test_aggregate_delay_s, config.eager) == (
        "amqp://x",
        1.5,
        False,
    )
    assert WorkerConfig.from_env({}).eager
