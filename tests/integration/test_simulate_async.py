"""``fedmq simulate --mode async``: an embedded FedBuff federation, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from db import blobstore
from db import queries as q
from db.engine import make_engine, session_scope
from fedmq.cli import app
from orchestrator.store import load
from protocol import codec
from workers.config import WorkerConfig
from workers.tasks.aggregate import aggregate_round
from workers.tasks.buffered import buffered_delta


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
    # here from the stored blobs (the invariant in its async form).
    with session_scope(engine) as s:
        for r in rounds:
            mv = q.get_model_version_by_id(s, r.model_version_id)
            base_mv = q.get_model_version_by_id(s, r.base_version_id)
            assert mv is not None and base_mv is not None
            base = codec.decode(blobstore.get(s, base_mv.blob_sha)).tensors
            updates = []
            for p in q.list_participations(s, r.id):
                if p.update_sha:
                    d = codec.decode(blobstore.get(s, p.update_sha))
                    assert d.delta and d.base_version is not None
                    updates.append((p.client_id, p.num_samples, int(d.base_version), d.tensors))
            delta, stalenesses = buffered_delta(updates, base_mv.version, "poly", 1.0)
            assert stalenesses == mv.metrics["staleness"]
            stored = codec.decode(blobstore.get(s, mv.blob_sha)).tensors
            for name, w in base.items():
                np.testing.assert_allclose(stored[name], w + delta[name], rtol=1e-5, atol=1e-6)

    # A re-run of a step's aggregation changes nothing and finds the same version.
    config = WorkerConfig(database_url=url)
    again = aggregate_round(config, run_id, rounds[0].number, 1)
    assert again["created"] is False and again["model_version"] == versions[0].version
    engine.dispose()
