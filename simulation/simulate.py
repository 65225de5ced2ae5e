"""``fedmq simulate``: a whole federation in one command.

Embedded by default (an in-process bus, a SQLite file in the output folder, tasks run
eagerly in this process); ``--broker``/``--database`` point it at real RabbitMQ and
Postgres instead, where a Celery worker must be running (``fedmq worker``). Either way the
orchestrator, the aggregation and the devices are the real ones, talking over the wire.
"""

from __future__ import annotations

import gc
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq import operator_token
from fedmq.settings import Settings
from fedmq.wiring import open_bus, orchestrator_service, privacy_config, run_configs
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import auth, codec, topology
from protocol.messages import Command, CommandAction, RoundState
from simulation import fleet_local
from simulation.fleet_local import Handle
from simulation.heterogeneity import Heterogeneity
from simulation.report import RoundRow, plot_accuracy, summary_table, write_json


@dataclass(frozen=True)
class SimOptions:
    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"
    partition_args: dict[str, Any] = field(default_factory=dict)
    clients: int = 5
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    proximal_mu: float | None = None  # FedProx's mu; None: the strategy's default (0.01)
    clip_norm: float | None = None  # the strategy's per-update clip (None: off)
    strategy: str = "fedavg"
    encoding: str = "bf16"
    seed: int = 0
    deadline_s: float = 120.0
    quorum: float | None = None  # default: 1.0, or 0.5 when devices may drop out
    min_clients: int | None = None  # default: the devices that are not late joiners
    max_clients: int | None = None  # a cap on the devices of one round (None: no cap)
    selection: str = "uniform"  # or "availability" (RoundPolicy.selection)
    heartbeat_timeout_s: float | None = None  # default: max(30, 6 heartbeats), 3 with dropouts
    heterogeneity: Heterogeneity = field(default_factory=Heterogeneity)
    out: Path = Path("fedmq-out")
    broker: str | None = None
    database: str | None = None
    # ``async``: FedBuff (orchestrator/state/buffered.py); ``rounds`` then counts version
    # steps of ``buffer_size`` updates each.
    mode: str = "sync"
    buffer_size: int = 10
    max_staleness: int = 10
    concurrency: int | None = None
    staleness: str = "poly"
    server_lr: float = 1.0
    # The run's privacy block (learning.privacy.PrivacyConfig); None: no DP.
    privacy: dict[str, Any] | None = None
    # Device k trains with the Flower client flower_clients[k] ("package.module:object",
    # devices/flower.py) where there is one and it is not None; the others are native.
    flower_clients: tuple[str | None, ...] = ()
    # The run's SecAgg+ block (orchestrator.state.secagg.RunSecAgg); None: updates in the
    # clear.
    secagg: dict[str, Any] | None = None


@dataclass
class SimResult:
    run_id: str
    rows: list[RoundRow]
    seconds: float
    outputs: dict[str, Path]


def _initial_model(o: SimOptions) -> bytes:
    """Version 0, built exactly as ``learning.replica`` builds it (same seed)."""
    data = load_dataset(o.dataset)
    model = build_model(
        o.model, num_classes=data.num_classes, input_shape=data.input_shape, seed=o.seed
    )
    return codec.encode(to_numpy(model), codec.Encoding.FP32)


def sim_settings(base: Settings, o: SimOptions, out: Path) -> Settings:
    broker = o.broker or f"memory://sim-{uuid.uuid4().hex[:8]}"
    database = o.database or f"sqlite:///{out / 'fedmq.sqlite'}"
    token = SecretStr(secrets.token_urlsafe(24))  # child processes inherit it through env
    return base.model_copy(
        update={"broker_url": broker, "database_url": database, "operator_token": token}
    )


def round_rows(sessions: Any, run_id: str) -> list[RoundRow]:
    rows = []
    with session_scope(sessions) as s:
        for r in q.list_rounds(s, run_id):
            if r.state != RoundState.DONE:
                continue
            selected = q.list_participations(s, r.id)
            parts = [p for p in selected if p.update_sha]
            base = q.get_model_version_by_id(s, r.base_version_id) if r.base_version_id else None
            # The global model is broadcast to every selected device of the round.
            down = blobstore.size(s, base.blob_sha) * len(selected) if base else 0
            m = r.metrics or {}
            end = r.closed_at or r.opened_at
            mv = q.get_model_version_by_id(s, r.model_version_id) if r.model_version_id else None
            dp = (mv.metrics.get("privacy") or {}) if mv is not None else {}
            rows.append(
                RoundRow(
                    round=r.number,
                    accuracy=m.get("accuracy"),
                    loss=m.get("loss"),
                    participants=len(parts),
                    seconds=float(m.get("duration_s", (end - r.opened_at).total_seconds())),
                    bytes_up=sum(p.bytes or 0 for p in parts),
                    bytes_down=down,
                    epsilon=dp.get("epsilon"),
                )
            )
    return rows


def _start_fleet(
    settings: Settings, run_id: str, o: SimOptions, stop: threading.Event
) -> list[Handle]:
    args = (settings, run_id, o.clients, o.dataset, o.model, o.partition)
    behaviours = o.heterogeneity.behaviours(
        o.clients, o.seed, 2 * policy_for(o, settings).heartbeat_timeout_s
    )
    if settings.embedded:
        return fleet_local.device_threads(
            *args,
            dict(o.partition_args),
            o.seed,
            o.encoding,
            stop,
            behaviours,
            flower_clients=o.flower_clients,
        )
    logs = o.out / "logs"
    worker = fleet_local.worker_process(settings, logs)
    devices = fleet_local.device_processes(
        *args,
        json.dumps(o.partition_args),
        o.seed,
        o.encoding,
        stop,
        logs,
        behaviours,
        args_for=lambda k: fleet_local.flower_args(o.flower_clients, k),
    )
    return [*devices, worker]


def policy_for(o: SimOptions, settings: Settings) -> RoundPolicy:
    """The run's rules: all devices in every round unless some may drop out (then half of
    them make a quorum, and a silent device is written off after 3 missed heartbeats), or
    at most ``max_clients`` of them, drawn as ``selection`` says."""
    h = o.heterogeneity
    quorum = o.quorum if o.quorum is not None else (0.5 if h.dropout else 1.0)
    timeout = o.heartbeat_timeout_s
    if timeout is None:
        beats = 3 if h.dropout else 6
        timeout = max(3.0 if h.dropout else 30.0, beats * settings.heartbeat_interval_s)
    min_clients = o.min_clients or max(1, o.clients - h.late_joiners)
    if o.max_clients is not None and o.min_clients is None:
        # The default waits for the whole fleet; with a cap a round takes only so many, so
        # it waits for that many (an explicit min_clients above the cap is refused).
        min_clients = min(min_clients, o.max_clients)
    if o.mode == "async":
        # No round waits for anyone: a slot waits deadline_s for its update at most.
        return RoundPolicy(
            min_clients=1,
            deadline_s=o.deadline_s,
            heartbeat_timeout_s=timeout,
            mode="async",
            buffer_size=o.buffer_size,
            max_staleness=o.max_staleness,
            concurrency=o.concurrency,
        )
    return RoundPolicy(
        min_clients=min_clients,
        quorum_fraction=quorum,
        deadline_s=o.deadline_s,
        heartbeat_timeout_s=timeout,
        max_clients=o.max_clients,
        selection=o.selection,  # type: ignore[arg-type]  # RoundPolicy checks it
    )


def strategy_config(o: SimOptions) -> dict[str, Any]:
    """``{"name": ..., **params}``; ``proximal_mu`` is a parameter of FedProx only (another
    strategy refuses it), and it reaches the devices through ``run_configs``."""
    params: dict[str, Any] = {} if o.proximal_mu is None else {"proximal_mu": o.proximal_mu}
    if o.clip_norm is not None:
        params["clip_norm"] = o.clip_norm
    return {"name": o.strategy, **params}


def create_sim_run(sessions: Any, o: SimOptions, settings: Settings, prefix: str = "sim") -> str:
    """A new run for these options, version 0 built as the replica builds it."""
    strategy, train = run_configs(
        strategy_config(o),
        {
            "epochs": o.local_epochs,
            "batch_size": o.batch_size,
            "lr": o.lr,
            "momentum": o.momentum,
            "encoding": o.encoding,
        },
    )
    dp, train = privacy_config(o.privacy, strategy, train)
    with session_scope(sessions) as session:
        return create_run(
            session,
            f"{prefix}-{uuid.uuid4().hex[:8]}",
            _initial_model(o),
            policy=policy_for(o, settings),
            strategy=strategy,
            train=train,
            secagg=o.secagg,
            extra_config={
                **(
                    {"async": {"staleness": o.staleness, "server_lr": o.server_lr}}
                    if o.mode == "async"
                    else {}
                ),
                "model": {"name": o.model},
                "dataset": {"name": o.dataset},
                "simulation": {k: str(v) for k, v in asdict(o).items()},
                **({"privacy": dp} if dp is not None else {}),
            },
        )


def start_autorun(bus: Any, settings: Settings, run_id: str, rounds: int) -> None:
    token = operator_token.find(settings)
    if token is None:
        raise operator_token.TokenError(
            "autorun needs the operator token: set FEDMQ_OPERATOR_TOKEN (or run where "
            f"`fedmq up` keeps it, {operator_token.token_path(settings)})"
        )
    cmd = auth.sign(Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=rounds), token)
    bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())


def run(o: SimOptions, base: Settings, console: Console) -> SimResult:
    out = o.out
    out.mkdir(parents=True, exist_ok=True)
    settings = sim_settings(base, o, out)
    migrations.upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    run_id = create_sim_run(sessions, o, settings)
    bus = open_bus(settings)
    service = orchestrator_service(settings, bus)
    service.start()
    stop = threading.Event()
    started = time.perf_counter()
    devices: list[Handle] = []
    restore: Callable[[], None] | None = None
    try:
        devices = _start_fleet(settings, run_id, o, stop)
        wait_ready(sessions, run_id, o.clients - o.heterogeneity.late_joiners, timeout=120)
        if settings.embedded:
            restore = _settle_for_rounds()
        start_autorun(bus, settings, run_id, o.rounds)
        follow(sessions, run_id, o.rounds, console)
    finally:
        stop.set()
        for d in devices:
            d.join(timeout=15)
        service.stop()
        bus.close()
        if restore is not None:
            restore()
    seconds = time.perf_counter() - started
    return report(sessions, run_id, o, seconds, console)


def _settle_for_rounds() -> Callable[[], None]:
    """Tune this process for an embedded fleet's rounds: K devices, the orchestrator and
    its tasks share one interpreter lock. Threads that let go of it often (each torch op,
    each SQLite call) waited up to the 5 ms switch interval to get it back from a busy one,
    which stretched a 3 ms local step to 30 ms; 1 ms measured 20 % shorter rounds at
    K = 100. The objects the fleet holds from now on (models, data, modules) are frozen out
    of the cyclic collector, whose full passes otherwise scan all of them again and again.
    Returns what undoes both."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    gc.collect()
    gc.freeze()

    def restore() -> None:
        sys.setswitchinterval(switch)
        gc.unfreeze()

    return restore


def report(
    sessions: Any, run_id: str, o: SimOptions, seconds: float, console: Console
) -> SimResult:
    """The summary table, metrics.json and accuracy.png of a finished run."""
    rows = round_rows(sessions, run_id)
    title = f"{o.dataset}/{o.model}, {o.clients} clients, {o.partition}, {o.strategy}"
    console.print(summary_table(rows, title))
    meta = {**asdict(o), "run_id": run_id, "seconds": seconds}
    outputs = {
        "metrics": write_json(o.out / "metrics.json", rows, meta),
        "plot": plot_accuracy(o.out / "accuracy.png", {o.strategy: rows}, title),
    }
    return SimResult(run_id, rows, seconds, outputs)


def wait_ready(
    sessions: Any,
    run_id: str,
    clients: int,
    timeout: float,
    stop: threading.Event | None = None,
) -> None:
    """Until ``clients`` devices registered (or ``stop`` is set: a signal arrived)."""
    deadline = time.monotonic() + timeout
    stop = stop or threading.Event()
    while time.monotonic() < deadline and not stop.is_set():
        with session_scope(sessions) as s:
            if len(q.list_clients(s, run_id)) >= clients:
                return
        stop.wait(0.1)
    if stop.is_set():
        return
    raise TimeoutError(f"only some of {clients} devices registered within {timeout:.0f} s")


def budget_spent(sessions: Any, run_id: str) -> str | None:
    """Why the run stopped for its privacy budget (its latest version says), or None."""
    with session_scope(sessions) as s:
        mv = q.latest_model_version(s, run_id)
        return None if mv is None else (mv.metrics.get("privacy") or {}).get("budget_spent")


def follow(
    sessions: Any,
    run_id: str,
    rounds_wanted: int,
    console: Console,
    stop: threading.Event | None = None,
) -> None:
    """A progress bar of the run's rounds until ``rounds_wanted`` are done (or ``stop``
    is set: SIGTERM or Ctrl-C must not wait for the rest of an autorun)."""
    stop = stop or threading.Event()
    columns = (
        TextColumn("rounds"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=rounds_wanted, acc="")
        while not stop.is_set():
            with session_scope(sessions) as s:
                rounds = q.list_rounds(s, run_id)
                done = [r for r in rounds if r.state == RoundState.DONE]
                failed_for_good = q.get_run(s, run_id)
                acc = (done[-1].metrics or {}).get("accuracy") if done else None
                remaining = failed_for_good.autorun_remaining if failed_for_good else None
            progress.update(
                task, completed=len(done), acc="" if acc is None else f"accuracy {100 * acc:.1f}%"
            )
            if len(done) >= rounds_wanted:
                return
            if (
                remaining is None
                and rounds
                and all(r.state in (RoundState.DONE, RoundState.FAILED) for r in rounds)
            ):
                spent = budget_spent(sessions, run_id)
                if spent is not None:
                    console.print(f"stopped after {len(done)} rounds: {spent}")
                    return
                raise RuntimeError("autorun stopped before all rounds were done (see events)")
            stop.wait(0.1)
