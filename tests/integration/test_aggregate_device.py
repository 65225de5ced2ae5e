"""The aggregate task with the pipeline: decode-ahead reading blobs from SQLite and
Postgres in its own thread, and the worker's device setting (``auto`` folds on the GPU
when there is one, ``cuda`` without one fails the task with a clear reason)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from db import queries as q
from db.engine import make_engine, session_scope
from protocol.codec import decode
from tests.integration.test_aggregate_task import COUNTS, SHAPES, model_of, seed_run
from workers.config import WorkerConfig
from workers.tasks import AggregationError, aggregate_round
from workers.tasks.aggregate import FAILED
from workers.tasks.common import dispose_all

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _dispose() -> Iterator[None]:
    yield
    dispose_all()


def test_aggregate_with_decode_ahead_and_device_auto_gives_fedavg(db_url: str) -> None:
    seeded = seed_run(db_url)
    out = aggregate_round(WorkerConfig(database_url=db_url, device="auto"), seeded.run_id, 1, 1)
    assert out["created"] and out["num_updates"] == len(COUNTS)
    mv, new = model_of(db_url, seeded.run_id, 1)
    want_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert mv.metrics["fold_device"] == want_device
    deltas = [decode(b).tensors for b in seeded.blobs]
    n = float(sum(COUNTS))
    for name in SHAPES:
        want = seeded.base[name].astype(np.float64) + sum(
            c / n * d[name].astype(np.float64) for c, d in zip(COUNTS, deltas, strict=True)
        )
        np.testing.assert_allclose(new[name], want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_device_cuda_without_a_gpu_fails_the_task_with_the_reason(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CI's view, on any machine
    seeded = seed_run(sqlite_url)
    config = WorkerConfig(database_url=sqlite_url, device="cuda")
    with pytest.raises(AggregationError, match="no CUDA device is available"):
        aggregate_round(config, seeded.run_id, 1, 1)
    engine = make_engine(sqlite_url)
    with session_scope(engine) as s:
        failed = q.list_events(s, seeded.run_id, kinds=[FAILED])
        assert len(failed) == 1 and "FEDMQ_WORKER_DEVICE" in failed[0].detail["error"]
        assert q.get_model_version(s, seeded.run_id, 1) is None
    engine.dispose()
