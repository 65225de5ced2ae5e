"""Hierarchical aggregation through the real tasks (eagerly), on SQLite and Postgres: a round
folded in parts equals the flat fold within the documented float64 tolerance (bit for bit
with one part), robust strategies fold flat and say so, and the parts are idempotent.

Each test seeds two runs with the same base model and the same update blobs, one folded
flat and one split, and compares their model versions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import Blob, BlobKind, Event
from protocol.codec import Encoding, encode
from tests.integration.test_aggregate_task import (
    client_blobs,
    count,
    make_base,
    model_of,
)
from workers import app as worker_app
from workers.app import AGGREGATE_TASK
from workers.config import WorkerConfig
from workers.tasks import AggregationError, aggregate_round
from workers.tasks.common import dispose_all, sessions
from workers.tasks.plan import PARTIAL_STARTED, plan_round
from workers.tasks.split import combine_round, partial_round

pytestmark = pytest.mark.integration

FLAT = {"split_threshold": 10_000}


def counts(k: int) -> list[int]:
    """Unequal sample counts, up to a few thousand (weights far from powers of two)."""
    return [int(c) for c in np.random.default_rng(7).integers(1, 3000, k)]


@dataclass
class SplitRun:
    url: str
    run_id: str
    base: dict[str, np.ndarray]
    blobs: list[bytes]
    counts: list[int]


def seed(
    url: str,
    name: str,
    k: int,
    *,
    strategy: Mapping[str, Any] | None = None,
    aggregation: Mapping[str, Any] | None = None,
) -> SplitRun:
    """A run (config ``aggregation``) with version 0 and round 1 of k bf16 delta updates;
    the base and blobs depend on k only, so two runs of one k hold the same updates."""
    migrations.upgrade(url)
    base = make_base()
    engine = make_engine(url)
    config: dict[str, Any] = {"strategy": dict(strategy or {"name": "fedavg"})}
    if aggregation is not None:
        config["aggregation"] = dict(aggregation)
    with session_scope(engine) as s:
        run = q.create_run(s, name, config)
        sha = blobstore.put(s, encode(base, Encoding.FP32), BlobKind.MODEL)
        q.create_model_version(s, run.id, sha)
        run_id = run.id
    engine.dispose()
    blobs = client_blobs(base, 0, seed=3, k=k)
    _add_round(url, run_id, name, blobs, counts(k))
    return SplitRun(url, run_id, base, blobs, counts(k))


def _add_round(url: str, run_id: str, name: str, blobs: list[bytes], ns: list[int]) -> None:
    """Round 1 on version 0. Client ids are random: ``blobs`` go to them in id order,
    the order the fold takes, so that two runs fold the same blobs in the same order."""
    engine = make_engine(url)
    with session_scope(engine) as s:
        base_mv = q.get_model_version(s, run_id, 0)
        assert base_mv is not None
        clients = sorted(
            q.register_client(s, run_id, f"dev-{i:04d}", q.hash_token(f"{name}-{i}"))
            for i in range(len(blobs))
        )
        rnd = q.create_round(
            s, run_id, 1, quorum=len(blobs), selected=clients, base_version_id=base_mv.id
        )
        for client, blob, n in zip(clients, blobs, ns, strict=True):
            sha = blobstore.put(s, blob, BlobKind.UPDATE)
            q.record_update(s, rnd.id, client, update_sha=sha, num_samples=n, nbytes=len(blob))
    engine.dispose()


@pytest.fixture
def configured(db_url: str) -> Iterator[WorkerConfig]:
    config = WorkerConfig(database_url=db_url)
    worker_app.configure(config)  # memory:// broker: tasks run eagerly, chords in place
    yield config
    worker_app.configure(WorkerConfig.from_env())
    dispose_all()


def _aggregate(run: SplitRun) -> dict[str, Any]:
    return dict(worker_app.aggregate.apply(args=(run.run_id, 1, 1)).get())


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_round_folded_in_parts_equals_the_flat_fold_within_float_rounding(
    configured: WorkerConfig, strategy: str
) -> None:
    k = 23  # parts of 7, 8 and 8 updates
    params = {"name": strategy}
    flat = seed(configured.database_url, "flat", k, strategy=params, aggregation=FLAT)
    split = seed(
        configured.database_url,
        "split",
        k,
        strategy=params,
        aggregation={"split_threshold": 20, "parts": 3},
    )
    got_flat, got_split = _aggregate(flat), _aggregate(split)
    assert got_split["created"] and got_split["model_version"] == 1
    for key in ("num_updates", "num_samples"):
        assert got_split[key] == got_flat[key]

    mv_flat, w_flat = model_of(flat.url, flat.run_id, 1)
    mv_split, w_split = model_of(split.url, split.run_id, 1)
    assert mv_flat.metrics["fold"] == "flat" and "fold_note" not in mv_flat.metrics
    assert mv_split.metrics["fold"] == "hierarchical"
    assert (mv_split.metrics["parts"], mv_split.metrics["part_updates"]) == (3, [7, 8, 8])
    # The float64 sums differ by rebracketing only (learning.strategies.aggregate states
    # the bound, far below float32's resolution): the fp32 models agree to one ulp.
    for name, value in w_flat.items():
        if value.dtype == np.float32:
            np.testing.assert_array_max_ulp(w_split[name], value, maxulp=1)
        else:
            np.testing.assert_array_equal(w_split[name], value)  # counters: the maximum
    if strategy == "fedadam":
        assert mv_split.metrics["server_state"]["strategy"] == "fedadam"

    engine = make_engine(split.url)
    with session_scope(engine) as s:
        starts = q.list_events(s, split.run_id, kinds=[PARTIAL_STARTED])
        assert sorted(e.detail["part"] for e in starts) == [0, 1, 2]
        # The partial sums were spent with the version: only models (and state) remain.
        others = set(s.scalars(select(Blob.sha256).where(Blob.kind == BlobKind.OTHER)))
    engine.dispose()
    states = {mv.metrics["server_state"]["sha256"] for mv in (mv_flat, mv_split)
              if "server_state" in mv.metrics}  # fmt: skip
    assert others == states


def test_one_part_is_the_flat_fold_bit_for_bit(configured: WorkerConfig) -> None:
    k = 9
    flat = seed(configured.database_url, "flat", k, aggregation=FLAT)
    split = seed(configured.database_url, "one", k, aggregation={"split_threshold": 0, "parts": 1})
    _aggregate(flat)
    _aggregate(split)
    _, w_flat = model_of(flat.url, flat.run_id, 1)
    mv_split, w_split = model_of(split.url, split.run_id, 1)
    assert (mv_split.metrics["fold"], mv_split.metrics["parts"]) == ("hierarchical", 1)
    assert w_split.keys() == w_flat.keys()
    for name, value in w_flat.items():
        assert w_split[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_fold_flat_and_say_so(configured: WorkerConfig, strategy: str) -> None:
    run = seed(
        configured.database_url,
        "robust",
        6,
        strategy={"name": strategy},
        aggregation={"split_threshold": 2, "parts": 3},
    )
    assert _aggregate(run)["num_updates"] == 6
    mv, _ = model_of(run.url, run.run_id, 1)
    assert mv.metrics["fold"] == "flat" and "parts" not in mv.metrics
    assert strategy in mv.metrics["fold_note"] and "folded flat" in mv.metrics["fold_note"]
    assert count(run.url, select(func.count()).where(Event.kind == PARTIAL_STARTED)) == 0


def test_a_rerun_part_stores_the_same_bytes_and_the_round_gets_one_version(
    configured: WorkerConfig,
) -> None:
    run = seed(configured.database_url, "rerun", 8, aggregation={"split_threshold": 0, "parts": 2})
    digest = _digest(configured, run)
    args = (run.run_id, 1, 1)
    first = [partial_round(configured, *args, p, 2, digest) for p in range(2)]
    blobs = count(run.url, select(func.count()).select_from(Blob))
    again = partial_round(configured, *args, 0, 2, digest)
    assert again["blob_sha256"] == first[0]["blob_sha256"]
    assert count(run.url, select(func.count()).select_from(Blob)) == blobs  # stored once

    done = combine_round(configured, [first[1], again], *args, 2, digest, 0.0)  # any order
    assert done["created"] and done["num_updates"] == 8
    assert combine_round(configured, first, *args, 2, digest, 0.0) == {**done, "created": False}
    assert partial_round(configured, *args, 1, 2, digest) == {"part": 1, "parts": 2, "done": True}
    engine = make_engine(run.url)
    with session_scope(engine) as s:
        for p in first:
            assert not blobstore.exists(s, p["blob_sha256"])  # spent with the version
    engine.dispose()


def test_parts_of_another_round_or_a_changed_round_are_refused(configured: WorkerConfig) -> None:
    run = seed(configured.database_url, "guard", 6, aggregation={"split_threshold": 0, "parts": 2})
    digest = _digest(configured, run)
    args = (run.run_id, 1, 1)
    wrong = partial_round(configured, *args, 0, 2, "0" * 64)
    assert "changed after it was split" in wrong["error"]
    with pytest.raises(AggregationError, match=r"part 0: .*changed after it was split"):
        combine_round(configured, [wrong, partial_round(configured, *args, 1, 2, digest)],
                      *args, 2, digest, 0.0)  # fmt: skip
    assert (
        "now splits into 2 parts, not 3" in partial_round(configured, *args, 0, 3, digest)["error"]
    )
    with pytest.raises(AggregationError, match=r"parts \[1\], not 0\.\.1"):
        combine_round(configured, [partial_round(configured, *args, 1, 2, digest)],
                      *args, 2, digest, 0.0)  # fmt: skip
    failed = count(run.url, select(func.count()).where(Event.kind == "aggregate.failed"))
    assert failed == 2


def test_a_part_without_a_usable_update_is_skipped_not_an_error(configured: WorkerConfig) -> None:
    run = seed(configured.database_url, "holes", 6, aggregation={"split_threshold": 0, "parts": 2})
    engine = make_engine(run.url)
    with session_scope(engine) as s:
        rnd = q.get_round(s, run.run_id, 1)
        assert rnd is not None
        junk = blobstore.put(s, b"not a tensor blob", BlobKind.UPDATE)
        for p in q.received_updates(s, rnd.id)[:3]:  # all of part 0
            p.update_sha = junk
    engine.dispose()
    out = _aggregate(run)
    assert out["num_updates"] == 3
    mv, _ = model_of(run.url, run.run_id, 1)
    assert mv.metrics["part_updates"] == [0, 3] and len(mv.metrics["skipped"]) == 3


def test_a_plain_call_folds_the_parts_in_place(configured: WorkerConfig) -> None:
    run = seed(configured.database_url, "plain", 5, aggregation={"split_threshold": 4, "parts": 5})
    out = aggregate_round(configured, run.run_id, 1, 1)  # no Celery at all
    assert out["created"] and out["num_updates"] == 5
    mv, _ = model_of(run.url, run.run_id, 1)
    assert mv.metrics["part_updates"] == [1, 1, 1, 1, 1]


def _digest(config: WorkerConfig, run: SplitRun) -> str:
    with session_scope(sessions(config.database_url)) as s:
        return plan_round(s, config, run.run_id, 1, 1).digest


def test_embedded_mode_sends_a_split_round_by_name_and_runs_it_in_place(sqlite_url: str) -> None:
    """As the embedded orchestrator's EagerTaskRunner does: a signature by name, with a
    task id, ``apply_async`` under ``task_always_eager``."""
    worker_app.configure(WorkerConfig(database_url=sqlite_url))
    try:
        run = seed(sqlite_url, "embedded", 7, aggregation={"split_threshold": 5, "parts": 2})
        signature = worker_app.app.signature(AGGREGATE_TASK, args=(run.run_id, 1, 1))
        out = signature.apply_async(task_id="agg-embedded-1").get()
        assert (out["created"], out["model_version"], out["num_updates"]) == (True, 1, 7)
        assert signature.apply_async(task_id="agg-embedded-2").get() == {**out, "created": False}
        mv, _ = model_of(sqlite_url, run.run_id, 1)
        assert (mv.metrics["fold"], mv.metrics["part_updates"]) == ("hierarchical", [3, 4])
    finally:
        worker_app.configure(WorkerConfig.from_env())
        dispose_all()
