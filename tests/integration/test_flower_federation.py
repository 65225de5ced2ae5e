"""Unmodified Flower clients (tests/flower_quickstart.py: Flower's PyTorch quickstart as a
``NumPyClient`` and as a Message-API ``ClientApp``) train digits federations on fedmq beside
native devices: in embedded mode they reach the accuracy native devices reach on the same
partitions, and in full mode (RabbitMQ, Postgres, worker, orchestrator and gateway as
processes) ``fedmq device --flower-client`` processes, over AMQP and over HTTP, contribute
to every round with their metrics."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pytest
from rich.console import Console

if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
    pytest.importorskip("flwr", reason="needs the flower extra: pip install 'fedmq[flower]'")

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ClientState
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, WireConfig
from fedmq.settings import Settings
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.messages import CommandAction
from simulation.simulate import SimOptions, run
from tests.integration.orchestrator_harness import Harness, harness
from tests.net import free_port, wait_http

NUMPY = "tests.flower_quickstart:numpy_app"
MESSAGE = "tests.flower_quickstart:message_app"


def _simulate(tmp: Path, flower: tuple[str | None, ...], rounds: int) -> tuple[list[float], Path]:
    options = SimOptions(clients=5, rounds=rounds, out=tmp, flower_clients=flower)
    result = run(options, Settings(_env_file=None), Console(file=io.StringIO(), width=120))
    assert [r.participants for r in result.rows] == [5] * rounds
    return [float(r.accuracy or 0.0) for r in result.rows], tmp / "fedmq.sqlite"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flower_clients_learn_what_native_devices_learn_embedded(tmp_path: Path) -> None:
    rounds = 10
    native, _ = _simulate(tmp_path / "native", (), rounds)
    mixed, db = _simulate(tmp_path / "mixed", (None, None, NUMPY, NUMPY, MESSAGE), rounds)
    print(f"accuracy per round, native: {native}\nmixed: {mixed}")
    assert native[-1] > 0.85 and mixed[-1] > 0.85, (native, mixed)
    # Same partitions, same initial model, same hyper-parameters: only the order of the
    # Flower clients' batches (their own DataLoader) differs from the native devices'.
    assert abs(mixed[-1] - native[-1]) <= 0.03, (native, mixed)
    sessions = make_sessionmaker(make_engine(f"sqlite:///{db}"))
    with session_scope(sessions) as s:
        (run_row,) = q.list_runs(s)
        for r in q.list_rounds(s, run_row.id):
            parts = [p for p in q.list_participations(s, r.id) if p.update_sha]
            assert len(parts) == 5
            # Every device's training loss reached the dashboard's table, Flower's too.
            assert all(p.loss is not None and p.train_time_s is not None for p in parts), r.number


def _ready(h: Harness, k: int) -> bool:
    return len(h.read(lambda s: q.list_clients(s, h.run_id, ClientState.READY))) == k


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_flower_device_processes_over_amqp_and_http_join_a_full_federation(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    k, rounds = 3, 3
    data = load_dataset("digits")
    model = build_model("mlp", num_classes=data.num_classes, input_shape=data.input_shape, seed=0)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    with harness(amqp_url, pg_url, tmp_path) as h:
        with session_scope(h.sessions) as s:
            h.run_id = create_run(
                s,
                f"flower-{uuid.uuid4().hex[:6]}",
                encode(to_numpy(model), Encoding.FP32),
                policy=RoundPolicy(min_clients=k, quorum_fraction=1.0, deadline_s=120),
                train={"epochs": 1, "lr": 0.05, "momentum": 0.9},
                extra_config={"model": {"name": "mlp"}, "dataset": {"name": "digits"}},
            )
        h.procs.orchestrator()
        h.procs.start("gateway", "-m", "fedmq.cli", "gateway", "--port", str(port))
        common = ("--run", h.run_id, "--clients", str(k), "--rounds", str(rounds))
        h.procs.start(
            "device-1-numpy",
            *("-m", "fedmq.cli", "device", "--index", "1", *common),
            *("--flower-client", NUMPY),
        )
        wait_http(f"{gateway}/openapi.json")
        h.procs.start(
            "device-2-message-http",
            *("-m", "fedmq.cli", "device", "--index", "2", *common),
            *("--flower-client", MESSAGE, "--transport", "http", "--gateway", gateway),
        )
        bus = connect(amqp_url)
        native = FederatedClient(
            DeviceConfig(
                run_id=h.run_id,
                client_index=0,
                num_clients=k,
                wire=WireConfig(heartbeat_s=1.0, poll_s=0.05),
                training=TrainingConfig(torch_threads=None),
            ),
            bus,
        )
        try:
            native.start(timeout=60)
            h.wait(lambda: _ready(h, k), 120, f"{k} ready clients")
            h.command(CommandAction.AUTORUN, rounds=rounds)
            h.wait(
                lambda: sum(r.state == "done" for r in h.rounds()) == rounds,
                180,
                f"{rounds} rounds to be done",
            )
            done = h.rounds()
            assert [(r.number, r.received) for r in done] == [
                (n, k) for n in range(1, rounds + 1)
            ], h.procs.output()
            accuracy = [float(r.metrics["accuracy"]) for r in done]
            print(f"flower + native federation accuracy per round: {accuracy}")
            assert accuracy[-1] > accuracy[0] and accuracy[-1] > 0.8, accuracy
            assert h.events("update.refused") == []
            for n in range(1, rounds + 1):
                parts = h.participations(n)
                assert len(parts) == k and all(p.loss is not None for p in parts), n
            assert native.rounds_trained == [1, 2, 3], native.errors
        finally:
            native.stop()
            bus.close()
