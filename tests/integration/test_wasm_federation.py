"""A mixed federation: 2 devices training in WebAssembly (``runtime="wasm"``) and 2 in
PyTorch, against the real orchestrator service in embedded mode (SQLite, the in-process bus,
eager tasks), 20 autorun rounds on digits. Its global model must land within 1 accuracy
point of the all-PyTorch run (the FedAvg replica, which an all-PyTorch federation computes
up to the bf16 transport of its updates)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, WireConfig
from devices.wasm_trainer import WasmTrainer
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import load_numpy, to_numpy
from learning.replica import ReplicaConfig, federation_data, run_replica
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol.bus import connect
from protocol.codec import Encoding, decode, encode
from workers.app import configure
from workers.config import WorkerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

K, ROUNDS = 4, 20
RUNTIMES = ["wasm", "wasm", "torch", "torch"]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(url)
    yield Settings(broker_url=f"memory://wasm-{uuid.uuid4().hex[:8]}", database_url=url)
    configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


def test_two_wasm_and_two_pytorch_devices_match_all_pytorch_after_20_rounds(
    settings: Settings,
) -> None:
    rc = ReplicaConfig(clients=K, rounds=ROUNDS)
    data, _ = federation_data(rc)
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as s:
        run_id = create_run(
            s, "wasm", encode(to_numpy(model), Encoding.FP32), policy=RoundPolicy(min_clients=K)
        )
    service = orchestrator_service(settings)
    service.start()
    bus = connect(settings.broker_url)
    configs = [
        DeviceConfig(
            run_id=run_id,
            client_index=k,
            num_clients=K,
            wire=WireConfig(heartbeat_s=0.5, poll_s=0.05),
            training=TrainingConfig(runtime=runtime),  # type: ignore[arg-type]
        )
        for k, runtime in enumerate(RUNTIMES)
    ]
    clients = [FederatedClient(c, bus).start() for c in configs]
    assert [isinstance(c.trainer, WasmTrainer) for c in clients] == [True, True, False, False]
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                if sum(c.state == "ready" for c in q.list_clients(s, run_id)) == K:
                    break
            time.sleep(0.1)
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(ROUNDS), time.time())
        rounds: list[tuple[int, str, int]] = []
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                rounds = [(r.number, str(r.state), r.received) for r in q.list_rounds(s, run_id)]
            if len(rounds) == ROUNDS and rounds[-1][1] == "done":
                break
            assert not [c.errors for c in clients if c.errors]
            time.sleep(0.2)
        assert rounds == [(r, "done", K) for r in range(1, ROUNDS + 1)]
        for c in clients:
            assert c.rounds_trained == list(range(1, ROUNDS + 1)) and not c.errors, c.errors
        with session_scope(sessions) as s:
            mv = q.get_model_version(s, run_id, ROUNDS)
            assert mv is not None
            final = decode(blobstore.get(s, mv.blob_sha)).tensors
    finally:
        for c in clients:
            c.stop()
        service.stop()
    load_numpy(model, final)
    _, mixed = evaluate(model, data.x_test, data.y_test)
    all_torch = run_replica(rc).rounds[-1].accuracy
    print(
        f"accuracy after {ROUNDS} rounds: 2 wasm + 2 torch {mixed:.4f}, all torch {all_torch:.4f}"
    )
    assert abs(mixed - all_torch) <= 0.01
    assert mixed > 0.9  # and both actually learned digits
