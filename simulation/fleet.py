"""``fedmq fleet``: N simulated devices as separate processes against a running stack.

Each device is ``fedmq device`` in its own process with its own partition, and may be made
slow, flaky (a dropout probability per round) or late (``simulation.heterogeneity``). The
orchestrator and a worker must already run (``fedmq up``, or docker compose). Without
``--run`` the fleet creates a run of its own; with ``--rounds`` it starts autorun once the
devices on time are in, follows the rounds, prints the summary and stops; otherwise it runs
until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from typing import Any

from rich.console import Console

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.settings import Settings
from fedmq.wiring import open_bus, run_configs
from protocol.messages import RoundState
from simulation import fleet_local
from simulation.fleet_local import ProcessHandle
from simulation.simulate import (
    SimOptions,
    create_sim_run,
    follow,
    policy_for,
    report,
    start_autorun,
    strategy_config,
    wait_ready,
)
from simulation.split_run import create_split_run

# How long devices get to leave (signal offline, delete their queue) once the fleet stops.
STOP_DEVICES_S = 8.0


def run(
    settings: Settings,
    o: SimOptions,
    console: Console,
    run_id: str | None = None,
    stop: threading.Event | None = None,
    split: bool = False,
) -> int:
    """``split``: the run is a split one (created so, or joined) and the devices are
    ``fedmq device --split``; the stack needs an edge worker (``fedmq up --split``)."""
    if settings.embedded:
        console.print(
            "[red]fedmq fleet needs a running stack: set FEDMQ_BROKER_URL (amqp://...) and "
            "FEDMQ_DATABASE_URL, and start the services (fedmq up)[/red]"
        )
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    sessions = make_sessionmaker(make_engine(settings.database_url))
    if run_id is None:
        if split:
            run_id = _create_split_run(sessions, o, settings)
        else:
            run_id = create_sim_run(sessions, o, settings, prefix="fleet")
        console.print(f"created {'split ' if split else ''}run {run_id}")
    else:
        with session_scope(sessions) as s:
            if q.get_run(s, run_id) is None:
                console.print(f"[red]no run {run_id!r} in the database[/red]")
                return 2
    h = o.heterogeneity
    console.print(f"fleet of {o.clients} devices for run {run_id}: {h.describe(o.clients, o.seed)}")
    logs = o.out / "logs"
    started = time.perf_counter()
    devices = fleet_local.device_processes(
        settings,
        run_id,
        o.clients,
        o.dataset,
        o.model,
        o.partition,
        json.dumps(o.partition_args),
        o.seed,
        o.encoding,
        stop,
        logs,
        h.behaviours(o.clients, o.seed, 2 * policy_for(o, settings).heartbeat_timeout_s),
        args_for=lambda k: ("--split",) if split else (),
    )
    console.print(f"device logs: {logs}/device-<k>.log")
    try:
        if o.rounds > 0:
            wait_ready(sessions, run_id, o.clients - h.late_joiners, timeout=120, stop=stop)
            if not stop.is_set():
                bus = open_bus(settings)
                try:
                    start_autorun(bus, settings, run_id, o.rounds)
                finally:
                    bus.close()
            follow(sessions, run_id, o.rounds, console, stop=stop)
        else:
            _watch(sessions, run_id, devices, stop, console)
    finally:
        interrupted = stop.is_set()
        stop.set()
        # Bounded in total: SIGTERM must stop the fleet within seconds (issue 17: it went
        # on training for 7 minutes, since nothing above looked at ``stop``).
        fleet_local.stop_processes(devices, timeout=STOP_DEVICES_S)
    if interrupted:
        console.print("fleet stopped")
        return 0
    if o.rounds > 0:
        result = report(sessions, run_id, o, time.perf_counter() - started, console)
        final = result.rows[-1].accuracy if result.rows else None
        shown = "" if final is None else f", final accuracy {100 * final:.2f}%"
        console.print(f"{len(result.rows)} rounds in {result.seconds:.1f} s{shown}")
    return 0


def _create_split_run(sessions: Any, o: SimOptions, settings: Settings) -> str:
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
    with session_scope(sessions) as s:
        return create_split_run(
            s,
            f"fleet-split-{uuid.uuid4().hex[:8]}",
            dataset=o.dataset,
            model=o.model,
            seed=o.seed,
            policy=policy_for(o, settings),
            strategy=strategy,
            train=train,
        )


def _watch(
    sessions: Any,
    run_id: str,
    devices: list[ProcessHandle],
    stop: threading.Event,
    console: Console,
) -> None:
    """Until Ctrl-C: a line whenever the run's count of done rounds changes."""
    seen = -1
    while not stop.wait(1.0):
        with session_scope(sessions) as s:
            rounds = q.list_rounds(s, run_id)
            clients = q.list_clients(s, run_id)
        done = [r for r in rounds if r.state == RoundState.DONE]
        if len(done) != seen:
            seen = len(done)
            acc = (done[-1].metrics or {}).get("accuracy") if done else None
            shown = "" if acc is None else f", accuracy {100 * acc:.2f}%"
            console.print(f"{len(clients)} devices registered, {seen} rounds done{shown}")
        if all(d.proc.poll() is not None for d in devices):
            console.print("[yellow]every device process has exited[/yellow]")
            return
