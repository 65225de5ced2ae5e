"""``fedmq simulate --mode async``: an embedded FedBuff federation, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from db import blobstore
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.cli import app
from learning.staleness import weight
from orchestrator.store import load
from protocol import codec
from tests.faults.async_invariants import AsyncInvariants
from workers.config import WorkerConfig
from workers.tasks.aggregate import aggregate_round


def test_an_async_federation_folds_each_update_into_one_version(tmp_path: Path) -> None:
    args = ["--mode", "async", "--clients", "4", "--rounds", "5", "--buffer-size", "2"]
    args += ["--concurrency", "3", "--max-staleness", "4", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    run_id = json.loads((tmp_path / "metrics.json").read_text())["config"]["run_id"]
    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    engine = make_engine(url)
    with session_scope(engine) as s:
        versions = q.list_model_versions(s, run_id)[1:]
        rounds = [r for r in q.list_rounds(s, run_id) if r.model_version_id is not None]
        folded = [
            (p.client_id, p.update_sha)
            for r in rounds
            for p in q.list_participations(s, r.id)
            if p.update_sha
        ]
        buffered = [
            (e.client_id, e.detail["ref"])
            for e in q.list_events(s, run_id, kinds=["update.buffered"], limit=10_000)
        ]
        fed = load(s, run_id)
        accuracy = [(r.metrics or {}).get("accuracy") for r in rounds]
    assert fed is not None
    assert len(versions) >= 5
    for v in versions:
        m = v.metrics
        assert m["fold"] == "buffered" and m["staleness_policy"] == "poly"
        assert m["num_updates"] == 2 and len(m["staleness"]) == 2
        assert sum(m["staleness_hist"].values()) == 2
    # Each accepted update is in exactly one version step, or still waits in the buffer.
    waiting = [(u.client_id, u.ref) for u in fed.buffer.updates]
    assert len(set(folded)) == len(folded)
    assert sorted(folded + waiting) == sorted(buffered)
    assert accuracy[-1] is not None and accuracy[-1] > 0.3  # chance is 0.1

    # Every version is its base plus the staleness-weighted buffered deltas, recomputed
    # from the stored blobs (the invariant in its async form).
    sessions = make_sessionmaker(engine)
    inv = AsyncInvariants(sessions, run_id)
    assert inv.check() == len(buffered)
    assert inv.stored == len(folded)

    # A re-run of a step's aggregation changes nothing and finds the same version.
    config = WorkerConfig(database_url=url)
    again = aggregate_round(config, run_id, rounds[0].number, 1)
    assert again["created"] is False and again["model_version"] == versions[0].version
    engine.dispose()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_full_mode_async_federation_is_recomputed_from_its_stored_blobs(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    """RabbitMQ, Postgres, a Celery worker and six device processes: every version is the
    previous plus its weighted buffered deltas, every buffered update in exactly one."""
    args = ["--mode", "async", "--clients", "6", "--rounds", "4", "--buffer-size", "3"]
    args += ["--concurrency", "4", "--max-staleness", "3", "--out", str(tmp_path)]
    args += ["--broker", amqp_url, "--database", pg_url]
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = json.loads((tmp_path / "metrics.json").read_text())["config"]["run_id"]
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    inv = AsyncInvariants(sessions, run_id)
    buffered = inv.check()
    with session_scope(sessions) as s:
        versions = q.list_model_versions(s, run_id)[1:]
        clients = {p.client_id for r in q.list_rounds(s, run_id) for p in
                   q.list_participations(s, r.id)}  # fmt: skip
    assert len(versions) >= 4 and inv.stored == 3 * len(versions)
    assert buffered >= inv.stored
    assert all(v.metrics["fold"] == "buffered" for v in versions)
    assert len(clients) >= 3  # the slots went round the fleet, not to one device
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == [*(f"device-{k}.log" for k in range(6)), "worker.log"]
    engine.dispose()


def test_clipping_and_a_robust_strategy_compose_with_the_buffer(tmp_path: Path) -> None:
    """A clip norm small enough to bite: every version is the base plus the weighted mean
    of the clipped deltas (the invariant clips as the worker must). FedMedian: every
    version is the base plus the median of the staleness-weighted deltas."""
    args = ["--mode", "async", "--clients", "4", "--rounds", "3", "--buffer-size", "3"]
    args += ["--concurrency", "4", "--clip-norm", "0.05", "--out", str(tmp_path / "clip")]
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = json.loads((tmp_path / "clip" / "metrics.json").read_text())["config"]["run_id"]
    engine = make_engine(f"sqlite:///{tmp_path / 'clip' / 'fedmq.sqlite'}")
    inv = AsyncInvariants(make_sessionmaker(engine), run_id)
    inv.check()
    with session_scope(engine) as s:
        versions = q.list_model_versions(s, run_id)[1:]
    assert len(versions) >= 3
    assert sum(v.metrics["clipped"] for v in versions) > 0  # the clip did bite
    assert all(v.metrics["buffer_reduce"] == "mean" for v in versions)
    engine.dispose()

    args = ["--mode", "async", "--clients", "4", "--rounds", "3", "--buffer-size", "3"]
    args += ["--strategy", "fedmedian", "--max-staleness", "4"]
    args += ["--concurrency", "4", "--out", str(tmp_path / "median")]
    result = CliRunner().invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = json.loads((tmp_path / "median" / "metrics.json").read_text())["config"]["run_id"]
    engine = make_engine(f"sqlite:///{tmp_path / 'median' / 'fedmq.sqlite'}")
    with session_scope(engine) as s:
        rounds = [r for r in q.list_rounds(s, run_id) if r.model_version_id is not None]
        assert len(rounds) >= 3
        for r in rounds:
            mv = q.get_model_version_by_id(s, r.model_version_id)
            base_mv = q.get_model_version_by_id(s, r.base_version_id)
            assert mv is not None and base_mv is not None
            assert mv.metrics["buffer_reduce"] == "fedmedian"
            base = codec.decode(blobstore.get(s, base_mv.blob_sha)).tensors
            scaled = []
            for p in sorted(q.received_updates(s, r.id), key=lambda p: p.client_id):
                d = codec.decode(blobstore.get(s, p.update_sha))
                assert d.delta and d.base_version is not None
                f = weight("poly", base_mv.version - int(d.base_version))
                scaled.append({k: f * v.astype(np.float64) for k, v in d.tensors.items()})
            stored = codec.decode(blobstore.get(s, mv.blob_sha)).tensors
            for name, w in base.items():
                median = np.median(np.stack([u[name] for u in scaled]), axis=0)
                np.testing.assert_allclose(stored[name], w + median, rtol=1e-5, atol=1e-6)
    engine.dispose()
