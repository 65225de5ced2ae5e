"""``fedmq simulate --split``: a SplitFed federation through the orchestrator.

The run's global model is the devices' part of the split model (head + tail: a normal
codec blob), so the orchestrator and the aggregate task run it like any other run: each
round the orchestrator announces the global head and tail, every selected device trains
them against the round's edge session (``devices.split_trainer.SplitTrainer``) and sends
a normal delta update, and the aggregate task FedAvgs the updates into the next version
(SplitFed, Thapa et al., AAAI 2022: device parts averaged, the server part shared).

The edge side is a driver here: for each round it starts the ``fedmq.edge.session`` task
for that round (``workers.edge.task``: the body resumes from the one named in the round's
base version and is stored after the session, named in the version the round makes).
Embedded mode runs the task eagerly on a thread of this process; full mode (``--broker``,
``--database``) sends it to a ``fedmq worker --queues edge`` process started here. After
each round the driver evaluates the composed model (the version's head and tail + the
round's body) and writes the accuracy into the round's metrics: the evaluate task has no
body and skips split runs (their model name, ``split-<model>``, has no evaluator).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models.enums import RoundState
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainSettings
from devices.split_trainer import SplitTrainer
from fedmq.settings import Settings, get_settings
from fedmq.wiring import (
    bus_config,
    decode_limits,
    open_bus,
    orchestrator_service,
    run_configs,
    task_runner,
    worker_config,
)
from learning.data import load_dataset
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import load_numpy, to_numpy
from learning.split import split_model
from orchestrator.runs import create_run
from orchestrator.tasks import TaskRunner
from protocol import codec
from protocol.bus import Bus, connect
from simulation import fleet_local
from simulation.fleet_local import Handle
from simulation.report import write_json
from simulation.simulate import SimOptions, policy_for, round_rows, start_autorun, wait_ready
from simulation.simulate import _settings as sim_settings
from workers.edge.bodies import body_ref
from workers.edge.task import run_edge_session

# An MLP needs two hidden layers to be cut; the default simulate MLP has one.
SPLIT_MODEL_CONFIG: dict[str, dict[str, Any]] = {"mlp": {"hidden": [128, 64]}}
EDGE_TASK = "fedmq.edge.session"


@dataclass(frozen=True)
class SplitSimOptions:
    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"
    partition_args: dict[str, Any] | None = None
    clients: int = 3
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    encoding: str = "bf16"
    seed: int = 0
    out: Path = Path("fedmq-out")
    broker: str | None = None
    database: str | None = None
    edge_device: str = "auto"
    pipeline: bool = False
    deadline_s: float = 120.0


@dataclass(frozen=True)
class SplitRound:
    round: int
    accuracy: float
    loss: float
    seconds: float
    bytes_sent: int
    model_version: int
    body_sha256: str
    resumed: bool  # the round's session started from the body stored by the round before


@dataclass
class SplitSimResult:
    run_id: str
    rounds: list[SplitRound]
    database_url: str


def model_spec(o: SplitSimOptions) -> dict[str, Any]:
    data = load_dataset(o.dataset, seed=o.seed)
    return {
        "name": o.model,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "seed": o.seed,
        "config": SPLIT_MODEL_CONFIG.get(o.model, {}),
    }


def build_full(spec: dict[str, Any]) -> Any:
    return build_model(
        spec["name"],
        num_classes=spec["num_classes"],
        input_shape=tuple(spec["input_shape"]),
        seed=spec["seed"],
        **spec["config"],
    )


def device_part(spec: dict[str, Any]) -> dict[str, Any]:
    """Version 0: the head and tail of the model built from the run's seed."""
    split = split_model(build_full(spec))
    names = set(split.state_names("head", "tail"))
    return {k: v for k, v in to_numpy(split.model).items() if k in names}


def _sim_options(o: SplitSimOptions) -> SimOptions:
    return SimOptions(
        dataset=o.dataset,
        model=o.model,
        partition=o.partition,
        partition_args=dict(o.partition_args or {}),
        clients=o.clients,
        rounds=o.rounds,
        local_epochs=o.local_epochs,
        batch_size=o.batch_size,
        lr=o.lr,
        momentum=o.momentum,
        encoding=o.encoding,
        seed=o.seed,
        deadline_s=o.deadline_s,
        out=o.out,
        broker=o.broker,
        database=o.database,
    )


def run_split(
    options: SplitSimOptions, log: Callable[[str], Any] = print, base: Settings | None = None
) -> SplitSimResult:
    o = options
    o.out.mkdir(parents=True, exist_ok=True)
    sim = _sim_options(o)
    s = sim_settings(base or get_settings(), sim, o.out)
    s = s.model_copy(update={"worker_device": o.edge_device})
    from db import migrations

    migrations.upgrade(s.database_url)
    sessions = make_sessionmaker(make_engine(s.database_url))
    spec = model_spec(o)
    run_id = _create_run(sessions, o, s, spec)
    bus = open_bus(s)
    service = orchestrator_service(s, bus)
    service.start()
    stop = threading.Event()
    handles: list[Handle] = []
    edge = _EdgeDriver(s, sessions, run_id, o, spec, stop, log)
    started = time.perf_counter()
    try:
        if not s.embedded:
            handles.append(
                fleet_local.worker_process(s, o.out / "logs", queues="aggregate,evaluate")
            )
            handles.append(
                fleet_local.worker_process(s, o.out / "logs", queues="edge", name="edge-worker")
            )
        handles.extend(_device_threads(s, run_id, o, stop))
        edge.start()
        wait_ready(sessions, run_id, o.clients, timeout=120)
        start_autorun(bus, s, run_id, o.rounds)
        edge.join(o.rounds * (o.deadline_s + 60))
        if edge.error is not None:
            raise RuntimeError(f"the edge driver failed: {edge.error!r}") from edge.error
        if len(edge.rounds) < o.rounds:
            raise RuntimeError(f"only {len(edge.rounds)} of {o.rounds} rounds finished")
        # The edge driver is done once it has evaluated the last round itself; the run is
        # done once the orchestrator has followed that round's evaluation too. Stopping in
        # between left round N "evaluating" (seen under load).
        _wait_run_finished(sessions, run_id, o.rounds, timeout=o.deadline_s + 60)
    finally:
        stop.set()
        edge.join(5)
        for h in handles:
            h.join(timeout=15)
        service.stop()
        bus.close()
    seconds = time.perf_counter() - started
    rows = round_rows(sessions, run_id)
    write_json(o.out / "metrics.json", rows, {**asdict(sim), "run_id": run_id, "split": True})
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()}
    (o.out / "split_metrics.json").write_text(
        json.dumps(
            {
                "config": config,
                "run_id": run_id,
                "seconds": seconds,
                "rounds": [asdict(x) for x in edge.rounds],
            },
            indent=2,
        )
        + "\n"
    )
    return SplitSimResult(run_id, edge.rounds, s.database_url)


def _create_run(sessions: Any, o: SplitSimOptions, s: Settings, spec: dict[str, Any]) -> str:
    strategy, train = run_configs(
        {"name": "fedavg"},
        {
            "epochs": o.local_epochs,
            "batch_size": o.batch_size,
            "lr": o.lr,
            "momentum": o.momentum,
            "encoding": o.encoding,
        },
    )
    with session_scope(sessions) as session:
        return create_run(
            session,
            f"split-{uuid.uuid4().hex[:8]}",
            codec.encode(device_part(spec), codec.Encoding.FP32),
            policy=policy_for(_sim_options(o), s),
            strategy=strategy,
            train=train,
            extra_config={
                # No evaluator knows this name: the evaluate task skips, the driver evaluates.
                "model": {"name": f"split-{o.model}"},
                "dataset": {"name": o.dataset},
                "split": spec,
                "simulation": {k: str(v) for k, v in asdict(o).items()},
            },
        )


def _device_threads(
    s: Settings, run_id: str, o: SplitSimOptions, stop: threading.Event
) -> list[Handle]:
    import torch

    torch.set_num_threads(1)  # K devices and the edge share this machine's cores
    handles: list[Handle] = []
    for k in range(o.clients):
        config = DeviceConfig(
            run_id=run_id,
            client_index=k,
            num_clients=o.clients,
            broker_url=s.broker_url,
            dataset=o.dataset,
            model=o.model,
            model_args=SPLIT_MODEL_CONFIG.get(o.model, {}),
            partition=o.partition,
            partition_args=dict(o.partition_args or {}),
            seed=o.seed,
            train=TrainSettings(),
            encoding=o.encoding,
            heartbeat_s=s.heartbeat_interval_s,
            chunk_size=s.chunk_size,
            bus=bus_config(s),
            decode_limits=decode_limits(s),
            torch_threads=None,
        )
        t = threading.Thread(
            target=_run_device, args=(config, o.pipeline, stop), name=f"split-device-{k}"
        )
        t.daemon = True
        t.start()
        handles.append(t)
    return handles


def _run_device(config: DeviceConfig, pipeline: bool, stop: threading.Event) -> None:
    """One device: a ``FederatedClient`` whose trainer trains split over a link of its own."""
    memory = config.broker_url.startswith("memory:")
    opened: list[Bus] = []

    def link() -> Bus:
        bus = connect(config.broker_url, config.bus)
        opened.append(bus)
        return bus

    bus = connect(config.broker_url, config.bus)
    trainer = SplitTrainer.from_device_config(config, link, pipeline=pipeline)
    try:
        FederatedClient(config, bus, trainer=trainer).run(stop)
    finally:
        if not memory:  # a named in-process bus belongs to the whole process
            for b in [bus, *opened]:
                b.close()


def _wait_run_finished(
    sessions: sessionmaker[Session], run_id: str, last: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(sessions) as s:
            rnd = q.get_round(s, run_id, last)
            if rnd is not None and rnd.state in (RoundState.DONE, RoundState.FAILED):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {last} did not finish within {timeout:.0f} s")
        time.sleep(0.05)


class _EdgeDriver(threading.Thread):
    """Round by round: start the round's edge session task, wait for it, evaluate."""

    def __init__(
        self,
        s: Settings,
        sessions: Any,
        run_id: str,
        o: SplitSimOptions,
        spec: dict[str, Any],
        stop: threading.Event,
        log: Callable[[str], Any],
    ) -> None:
        super().__init__(name="split-edge-driver", daemon=True)
        self.s, self.sessions, self.run_id, self.o, self.spec = s, sessions, run_id, o, spec
        self.stop, self.log = stop, log
        self.rounds: list[SplitRound] = []
        self.error: BaseException | None = None
        self._runner: TaskRunner | None = None
        self.data = load_dataset(o.dataset, seed=o.seed)

    def run(self) -> None:
        try:
            for r in range(1, self.o.rounds + 1):
                expected = self._wait_round(r)
                if expected is None:
                    return
                began = time.perf_counter()
                served = self._serve(r, self._spec(r, expected))
                if served is None:
                    return
                resumed = bool(served.get("resumed"))
                self.rounds.append(self._evaluate(r, time.perf_counter() - began, resumed))
                row = self.rounds[-1]
                self.log(
                    f"round {r}: accuracy {100 * row.accuracy:.2f}%, loss {row.loss:.4f}, "
                    f"{row.seconds:.1f} s, body {row.body_sha256[:12]}"
                )
        except BaseException as e:
            self.error = e

    def _serve(self, r: int, spec: dict[str, Any]) -> dict[str, Any] | None:
        """Round ``r``'s edge session's result; None when stopped while it ran elsewhere."""
        if self.s.embedded:
            # The task's body on this thread, not Celery's eager mode: eager tasks of two
            # threads share Celery's task stack (the orchestrator's tasks would fail).
            return run_edge_session(worker_config(self.s), spec)
        task_id = f"edge-{self.run_id}-r{r}"
        if self._runner is None:
            self._runner = task_runner(self.s)
        runner = self._runner
        runner.send(EDGE_TASK, [spec], task_id, "edge")
        while (status := runner.poll(task_id)).state == "pending":
            if self.stop.wait(0.1):
                return None
        if status.state != "success":
            raise RuntimeError(f"edge session of round {r} failed: {status.error}")
        return status.result or {}

    def _spec(self, r: int, expected: int) -> dict[str, Any]:
        o = self.o
        return {
            "run_id": self.run_id,
            "round": r,
            "model": self.spec,
            "train": {"lr": o.lr, "momentum": o.momentum},
            "edge": {"expected_devices": expected, "idle_timeout_s": o.deadline_s},
            "version_wait_s": o.deadline_s,
        }

    def _wait_round(self, r: int) -> int | None:
        """Devices selected in round ``r`` once it is open; None when stopped."""
        while not self.stop.is_set():
            with session_scope(self.sessions) as s:
                rnd = q.get_round(s, self.run_id, r)
                if rnd is not None:
                    selected = q.list_participations(s, rnd.id)
                    if selected:
                        return len(selected)
            self.stop.wait(0.05)
        return None

    def _evaluate(self, r: int, seconds: float, resumed: bool) -> SplitRound:
        """The composed model of round ``r``: its version's head and tail + its body."""
        limits = decode_limits(self.s)
        with session_scope(self.sessions) as s:
            rnd = q.get_round(s, self.run_id, r)
            if rnd is None or rnd.state == RoundState.FAILED or rnd.model_version_id is None:
                raise RuntimeError(f"round {r} made no model version")
            mv = q.get_model_version_by_id(s, rnd.model_version_id)
            assert mv is not None
            sha = body_ref(mv.metrics)
            if sha is None:
                raise RuntimeError(f"round {r}: version {mv.version} names no body")
            parts = codec.decode(blobstore.get(s, mv.blob_sha), limits=limits).tensors
            body = codec.decode(blobstore.get(s, sha), limits=limits).tensors
            version = mv.version
            sent = sum(p.bytes or 0 for p in q.list_participations(s, rnd.id))
        model = build_full(self.spec)
        load_numpy(model, {**to_numpy(model), **parts, **body})
        loss, acc = evaluate(model, self.data.x_test, self.data.y_test)
        with session_scope(self.sessions) as s:
            rnd = q.get_round(s, self.run_id, r)
            assert rnd is not None
            q.set_round_metrics(
                s, rnd.id, {"accuracy": acc, "loss": loss, "model_version": version}
            )
        return SplitRound(r, acc, loss, seconds, sent, version, sha, resumed)
