"""Two FederatedClients against the real orchestrator service in embedded mode (SQLite, the
in-process bus, eager tasks): two autorun rounds, and the global model they produce is the
plain FedAvg replica's (up to the bf16 transport of the updates)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.client import FederatedClient
from devices.config import DeviceConfig, WireConfig
from devices.identity import load_identity
from fedmq.settings import Settings
from fedmq.wiring import orchestrator_service
from learning.models import build_model
from learning.params import Arrays, load_numpy, to_numpy
from learning.replica import ReplicaConfig, client_seed, fedavg, federation_data, initial_model
from learning.train import train_local
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol import topology
from protocol.bus import REASON_HEADER, connect
from protocol.codec import Encoding, decode, encode
from workers.app import configure
from workers.config import WorkerConfig

pytestmark = [pytest.mark.timeout(90)]

K = 2


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'fedmq.sqlite'}"
    migrations.upgrade(url)
    yield Settings(broker_url=f"memory://dev-{uuid.uuid4().hex[:8]}", database_url=url)
    configure(WorkerConfig.from_env())  # the eager runner configured the shared worker app


def _replica(rounds: int) -> Arrays:
    """The global weights after ``rounds`` rounds of the single-process FedAvg replica."""
    rc = ReplicaConfig(clients=K)
    data, parts = federation_data(rc)
    model = initial_model(rc, data)
    w = to_numpy(model)
    for r in range(1, rounds + 1):
        updates = []
        for k, idx in enumerate(parts):
            load_numpy(model, w)
            train_local(
                model,
                data.x_train[idx],
                data.y_train[idx],
                epochs=1,
                batch_size=rc.batch_size,
                lr=rc.lr,
                momentum=rc.momentum,
                seed=client_seed(rc.seed, r, k),
            )
            updates.append((to_numpy(model), len(idx)))
        w = fedavg(w, updates)
    return w


def test_two_devices_two_rounds_match_the_replica(settings: Settings) -> None:
    rc = ReplicaConfig(clients=K)
    data, _ = federation_data(rc)
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as s:
        run_id = create_run(
            s, "dev", encode(to_numpy(model), Encoding.FP32), policy=RoundPolicy(min_clients=K)
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
        )
        for k in range(K)
    ]
    clients = [FederatedClient(c, bus).start() for c in configs]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                if sum(c.state == "ready" for c in q.list_clients(s, run_id)) == K:
                    break
            time.sleep(0.1)
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(2), time.time())
        rounds: list[tuple[int, str, int]] = []
        while time.monotonic() < deadline:
            with session_scope(sessions) as s:
                rounds = [(r.number, str(r.state), r.received) for r in q.list_rounds(s, run_id)]
            if len(rounds) == 2 and rounds[-1][1] == "done":
                break
            time.sleep(0.2)
        assert rounds == [(1, "done", K), (2, "done", K)]
        for c in clients:
            assert c.rounds_trained == [1, 2] and not c.errors, c.errors
            assert c.wait_rounds(2) and len(c.accepted) >= 1
        with session_scope(sessions) as s:
            mv = q.get_model_version(s, run_id, 2)
            assert mv is not None
            final = decode(blobstore.get(s, mv.blob_sha)).tensors
        dead = []
        while (d := bus.get(topology.DEAD_LETTER_QUEUE)) is not None:
            d.ack()
            dead.append(d.headers.get(REASON_HEADER))
        assert dead == []  # the devices sent nothing the orchestrator refused
        with session_scope(sessions) as s:  # ... nor did its dead-letters consumer drop any
            assert not q.list_events(s, kinds=["dead_letter.dropped"])
        expected = _replica(2)
        for name, w in expected.items():
            np.testing.assert_allclose(final[name], w, atol=2e-3, err_msg=name)
    finally:
        for c in clients:
            c.stop()
        service.stop()


def test_a_restarted_device_resumes_as_the_same_client(settings: Settings, tmp_path: Path) -> None:
    """With an identity file, a device that died without leaving comes back as the client it
    was (no second registration) and trains the next round; a file kept for another run is
    ignored."""
    data, _ = federation_data(ReplicaConfig(clients=1))
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as s:
        run_id = create_run(
            s, "resume", encode(to_numpy(model), Encoding.FP32), policy=RoundPolicy(min_clients=1)
        )
    service = orchestrator_service(settings)
    service.start()
    bus = connect(settings.broker_url)
    path = tmp_path / "device" / "identity.json"
    config = DeviceConfig(
        run_id=run_id,
        client_index=0,
        num_clients=1,
        wire=WireConfig(heartbeat_s=0.5, poll_s=0.05, identity_file=path),
    )

    def done_rounds() -> list[tuple[int, int]]:
        with session_scope(sessions) as s:
            return [(r.number, r.received) for r in q.list_rounds(s, run_id) if r.state == "done"]

    def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 40
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def ready() -> bool:
        with session_scope(sessions) as s:
            return [c.state for c in q.list_clients(s, run_id)] == ["ready"]

    first = FederatedClient(config, bus).start()
    try:
        wait(ready, "the device ready")
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(1), time.time())
        wait(lambda: done_rounds() == [(1, 1)], "round 1")
        assert first.wait_rounds(1) and not first.resumed
    finally:
        first.stop(leave=False)  # dies: no offline signal, its queue stays
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the token
    second = FederatedClient(config, bus).start()
    try:
        assert second.resumed and second.client_id == first.client_id
        wait(ready, "the resumed device ready")
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(1), time.time())
        wait(lambda: done_rounds() == [(1, 1), (2, 1)], "round 2")
        assert second.wait_rounds(1) and second.rounds_trained == [2]
        with session_scope(sessions) as s:
            assert [c.id for c in q.list_clients(s, run_id)] == [first.client_id]
    finally:
        second.stop()
        service.stop()
        bus.close()
    other = dataclasses.replace(config, run_id="another-run")
    assert load_identity(path, other.run_id) is None
