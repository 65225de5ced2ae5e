"""``fedmq simulate --split``: a SplitFed federation, run by the platform like any other.

The run's global model is the devices' part of the split model (head + tail: a normal
codec blob), so the orchestrator and the aggregate task run it like any other run: each
round the orchestrator announces the global head and tail, every selected device trains
them against the round's edge session (``devices.split_trainer.SplitTrainer``) and sends
a normal delta update, and the aggregate task FedAvgs the updates into the next version
(SplitFed, Thapa et al., AAAI 2022: device parts averaged, the server part shared).

All of that is the platform's (docs/architecture.md, "Split learning"): the run says it is
split (``simulation.split_run``), the orchestrator starts each round attempt's edge session
(an outbox task on queue ``edge``), and the evaluate task scores the composed model (the
version's head and tail + the body the session stored). This module only creates the run
and its devices and waits for the rounds. Embedded mode: the tasks run in this process
(the edge session on a thread of its own, the devices as threads); full mode (``--broker``,
``--database``): an aggregate/evaluate worker, an edge worker and ``fedmq device --split``
processes, all started here.
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

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models.enums import RoundState
from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig
from devices.split_trainer import SplitTrainer
from fedmq.settings import Settings, get_settings
from fedmq.wiring import device_config, open_bus, orchestrator_service, run_configs
from learning.split.spec import model_config
from protocol.bus import Bus, connect
from simulation import fleet_local
from simulation.fleet_local import Handle
from simulation.report import write_json
from simulation.simulate import (
    SimOptions,
    policy_for,
    round_rows,
    sim_settings,
    start_autorun,
    wait_ready,
)
from simulation.split_run import create_split_run
from workers.edge.bodies import body_ref
from workers.edge.rounds import SESSION_DONE


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
    settings = sim_settings(base or get_settings(), sim, o.out)
    settings = settings.model_copy(update={"worker_device": o.edge_device})
    from db import migrations

    migrations.upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    run_id = _create_run(sessions, o, settings)
    bus = open_bus(settings)
    service = orchestrator_service(settings, bus)
    service.start()
    stop = threading.Event()
    handles: list[Handle] = []
    started = time.perf_counter()
    try:
        if settings.embedded:
            handles.extend(_device_threads(settings, run_id, o, stop))
        else:
            logs = o.out / "logs"
            handles.append(fleet_local.worker_process(settings, logs, queues="aggregate,evaluate"))
            handles.append(
                fleet_local.worker_process(settings, logs, queues="edge", name="edge-worker")
            )
            handles.extend(_device_processes(settings, run_id, o, stop, logs))
        wait_ready(sessions, run_id, o.clients, timeout=180)
        start_autorun(bus, settings, run_id, o.rounds)
        # Done when the run's last round is: evaluated by the orchestrator's task, its
        # accuracy in the round's metrics (issue 22: reporting before that left round N
        # "evaluating").
        _wait_rounds(sessions, run_id, o.rounds, o.rounds * (o.deadline_s + 120), log)
    finally:
        stop.set()
        for h in handles:
            h.join(timeout=15)
        service.stop()
        bus.close()
    seconds = time.perf_counter() - started
    rounds = split_rounds(sessions, run_id)
    write_json(o.out / "metrics.json", round_rows(sessions, run_id),
               {**asdict(sim), "run_id": run_id, "split": True})  # fmt: skip
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()}
    (o.out / "split_metrics.json").write_text(
        json.dumps(
            {
                "config": config,
                "run_id": run_id,
                "seconds": seconds,
                "rounds": [asdict(x) for x in rounds],
            },
            indent=2,
        )
        + "\n"
    )
    return SplitSimResult(run_id, rounds, settings.database_url)


def _create_run(sessions: sessionmaker[Session], o: SplitSimOptions, settings: Settings) -> str:
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
    with session_scope(sessions) as s:
        return create_split_run(
            s,
            f"split-{uuid.uuid4().hex[:8]}",
            dataset=o.dataset,
            model=o.model,
            seed=o.seed,
            policy=policy_for(_sim_options(o), settings),
            strategy=strategy,
            train=train,
            extra_config={"simulation": {k: str(v) for k, v in asdict(o).items()}},
        )


def _wait_rounds(
    sessions: sessionmaker[Session],
    run_id: str,
    rounds: int,
    timeout: float,
    log: Callable[[str], Any],
) -> None:
    """Until ``rounds`` rounds are done (a line for each as it is); raises when the run
    stopped short (a round failed for good) or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    said = 0
    while True:
        with session_scope(sessions) as s:
            rows = q.list_rounds(s, run_id)
            run = q.get_run(s, run_id)
            done = [r for r in rows if r.state == RoundState.DONE]
            for r in done[said:]:
                m = r.metrics or {}
                acc = m.get("accuracy")
                shown = "no accuracy" if acc is None else f"accuracy {100 * acc:.2f}%"
                log(f"round {r.number}: {shown}, loss {m.get('loss', float('nan')):.4f}")
            said = len(done)
            failed = [r.number for r in rows if r.state == RoundState.FAILED]
            autorun = run.autorun_remaining if run else None
        if said >= rounds:
            return
        if failed and autorun is None:
            raise RuntimeError(f"round {failed[-1]} failed and autorun stopped (see events)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {said} of {rounds} rounds finished in {timeout:.0f} s")
        time.sleep(0.1)


def split_rounds(sessions: sessionmaker[Session], run_id: str) -> list[SplitRound]:
    """The done rounds of a split run with their edge sessions' figures."""
    out: list[SplitRound] = []
    with session_scope(sessions) as s:
        sessions_done = {
            (e.round, e.detail.get("attempt")): e.detail
            for e in q.list_events(s, run_id, kinds=[SESSION_DONE], limit=10_000)
        }
        for r in q.list_rounds(s, run_id):
            if r.state != RoundState.DONE or r.model_version_id is None:
                continue
            mv = q.get_model_version_by_id(s, r.model_version_id)
            assert mv is not None
            m = r.metrics or {}
            end = r.closed_at or r.opened_at
            edge = sessions_done.get((r.number, r.attempt), {})
            out.append(
                SplitRound(
                    round=r.number,
                    accuracy=float(m.get("accuracy", float("nan"))),
                    loss=float(m.get("loss", float("nan"))),
                    seconds=float(m.get("duration_s", (end - r.opened_at).total_seconds())),
                    bytes_sent=sum(p.bytes or 0 for p in q.list_participations(s, r.id)),
                    model_version=mv.version,
                    body_sha256=body_ref(mv.metrics) or "",
                    resumed=bool(edge.get("resumed", False)),
                )
            )
    return out


def _device_config(settings: Settings, run_id: str, o: SplitSimOptions, k: int) -> DeviceConfig:
    return device_config(
        settings,
        run_id,
        k,
        o.clients,
        training=TrainingConfig(
            dataset=o.dataset,
            model=o.model,
            model_args=model_config(o.model),
            partition=o.partition,
            partition_args=dict(o.partition_args or {}),
            seed=o.seed,
            encoding=o.encoding,
            torch_threads=None,
        ),
    )


def _device_processes(
    settings: Settings, run_id: str, o: SplitSimOptions, stop: threading.Event, logs: Path
) -> list[fleet_local.ProcessHandle]:
    """``fedmq device --split`` processes, one per partition."""
    extra = ("--split", *(("--split-pipeline",) if o.pipeline else ()))
    return fleet_local.device_processes(
        settings, run_id, o.clients, o.dataset, o.model, o.partition,
        json.dumps(o.partition_args or {}), o.seed, o.encoding, stop, logs,
        args_for=lambda k: extra,
    )  # fmt: skip


def _device_threads(
    settings: Settings, run_id: str, o: SplitSimOptions, stop: threading.Event
) -> list[Handle]:
    import torch

    torch.set_num_threads(1)  # K devices and the edge share this machine's cores
    handles: list[Handle] = []
    for k in range(o.clients):
        t = threading.Thread(
            target=_run_device,
            args=(_device_config(settings, run_id, o, k), o.pipeline, stop),
            name=f"split-device-{k}",
            daemon=True,
        )
        t.start()
        handles.append(t)
    return handles


def _run_device(config: DeviceConfig, pipeline: bool, stop: threading.Event) -> None:
    """One device: a ``FederatedClient`` whose trainer trains split over a link of its own."""
    memory = config.wire.broker_url.startswith("memory:")
    opened: list[Bus] = []

    def link() -> Bus:
        bus = connect(config.wire.broker_url, config.wire.bus)
        opened.append(bus)
        return bus

    bus = connect(config.wire.broker_url, config.wire.bus)
    trainer = SplitTrainer.from_device_config(config, link, pipeline=pipeline)
    try:
        FederatedClient(config, bus, trainer=trainer).run(stop)
    finally:
        if not memory:  # a named in-process bus belongs to the whole process
            for b in [bus, *opened]:
                b.close()
