"""SplitFed through the real platform: the orchestrator's rounds, the aggregate task's
FedAvg of the devices' head/tail updates, and the edge body stored per round.

Embedded mode (in-process bus, SQLite, eager tasks, the edge session on a thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from db import blobstore
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models.enums import RoundState
from learning.params import load_numpy, to_numpy
from learning.split import split_model
from learning.split.spec import build_full, model_spec
from protocol.codec import decode
from simulation.split_sim import SplitSimOptions, run_split
from workers.edge.bodies import body_ref


def test_a_split_federation_runs_through_the_orchestrator_and_stores_every_body(
    tmp_path: Path,
) -> None:
    o = SplitSimOptions(clients=2, rounds=3, out=tmp_path / "out", deadline_s=60)
    result = run_split(o, log=lambda _line: None)

    rows = result.rounds
    assert [r.round for r in rows] == [1, 2, 3]
    assert rows[-1].accuracy > rows[0].accuracy
    assert rows[-1].accuracy > 0.6  # digits, 10 classes: chance is 0.1
    # Every session after the first starts from the body the round before stored.
    assert [r.resumed for r in rows] == [False, True, True]

    spec = model_spec(o.dataset, o.model, o.seed)
    split = split_model(build_full(spec))
    device_names = set(split.state_names("head", "tail"))
    body_names = set(to_numpy(split.model)) - device_names
    sessions = make_sessionmaker(make_engine(result.database_url))
    bodies = []
    with session_scope(sessions) as s:
        rounds = q.list_rounds(s, result.run_id)
        assert [(r.number, r.state) for r in rounds] == [(n, RoundState.DONE) for n in (1, 2, 3)]
        for rnd in rounds:
            assert rnd.model_version_id is not None and rnd.base_version_id is not None
            mv = q.get_model_version_by_id(s, rnd.model_version_id)
            base = q.get_model_version_by_id(s, rnd.base_version_id)
            assert mv is not None and base is not None
            version = decode(blobstore.get(s, mv.blob_sha)).tensors
            assert set(version) == device_names  # the global model is the devices' part

            # FedAvg of the updates, recomputed: base + sum(n_k / n * delta_k).
            start = decode(blobstore.get(s, base.blob_sha)).tensors
            parts = [p for p in q.list_participations(s, rnd.id) if p.update_sha]
            assert len(parts) == 2
            total = sum(p.num_samples or 0 for p in parts)
            expect = {n: np.asarray(v, np.float64) for n, v in start.items()}
            for p in parts:
                assert p.update_sha is not None and p.num_samples
                d = decode(blobstore.get(s, p.update_sha)).tensors
                for n in expect:
                    expect[n] += p.num_samples / total * np.asarray(d[n], np.float64)
            for n, v in version.items():
                np.testing.assert_allclose(v, expect[n], rtol=1e-5, atol=1e-6, err_msg=n)

            sha = body_ref(mv.metrics)
            assert sha is not None and mv.metrics["split_body"]["round"] == rnd.number
            body = decode(blobstore.get(s, sha)).tensors
            assert set(body) == body_names
            bodies.append(body)
            # Loadable: head/tail + body compose the whole model.
            load_numpy(split.model, {**version, **body})
    first, last = bodies[0], bodies[-1]
    assert any(not np.array_equal(first[n], last[n]) for n in body_names)  # trained on
