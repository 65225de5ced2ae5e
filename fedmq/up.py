"""``fedmq up``: the full stack as native processes, for machines without Docker.

Migrates the database, then starts the orchestrator, a worker, the REST gateway and the
dashboard (the same services as docker-compose.yml) against the configured RabbitMQ and
database, each logging to ``<logs>/<name>.log``; with ``--split`` an edge worker (queue
``edge``) for split runs; optionally a fleet of simulated devices (split with ``--split``).

It supervises them: a service that exits is started again after a capped, growing delay
(``RestartPolicy``), and only a crash loop (``crash_loop_exits`` exits within
``crash_loop_window_s``) makes it give up, loudly, and stop the stack. Each child's state
(running, restarting, crash-loop, stopped) is written to ``service_health`` for the
dashboard, since a dead process cannot write its own. Ctrl-C or SIGTERM stops them all
within a bounded time (SIGTERM, then SIGKILL to the child's process group after
``grace_s``). The fleet is a job, not a service: when it has run its rounds it exits and
the stack stays; a fleet that fails is reported, not restarted (it would start a new run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from rich.console import Console

from db import migrations
from db.engine import make_engine, make_sessionmaker, session_scope
from db.health import host
from db.queries.health import HealthRow, record_health
from fedmq import broker_users, operator_token
from fedmq.settings import Settings


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    job: bool = False  # may exit when done without taking the stack down
    restarts: int = 0
    exits: list[float] = field(default_factory=list)  # time.monotonic() of each exit
    restart_at: float | None = None  # set while it waits to be started again
    last_rc: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # beside the stack's environment


@dataclass(frozen=True)
class RestartPolicy:
    """How ``fedmq up`` restarts a service that exited: after ``backoff_s``, doubling per
    recent exit up to ``backoff_max_s``; a service that exits ``crash_loop_exits`` times
    within ``crash_loop_window_s`` is in a crash loop, and restarting it again only hides
    the fault: the stack stops, saying why."""

    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 300.0

    def recent(self, exits: list[float], now: float) -> int:
        return sum(1 for t in exits if now - t <= self.crash_loop_window_s)

    def delay(self, recent_exits: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, recent_exits - 1)))

    def crash_loop(self, exits: list[float], now: float) -> bool:
        return self.recent(exits, now) >= self.crash_loop_exits


@dataclass(frozen=True)
class StackOptions:
    worker_queues: str = "aggregate,evaluate"
    gateway: bool = True
    dashboard: bool = True
    fleet: int = 0  # devices; 0: none
    fleet_rounds: int = 0  # autorun rounds the fleet starts (0: the operator starts them)
    split: bool = False  # an edge worker for split runs; the fleet's run is split


def services(o: StackOptions) -> list[Service]:
    fedmq = [sys.executable, "-m", "fedmq.cli"]
    started = [
        Service("orchestrator", [*fedmq, "orchestrator"]),
        Service("worker", [*fedmq, "worker", "--queues", o.worker_queues]),
    ]
    if o.split:
        # Its own worker: an edge session holds its process for a whole round attempt, and
        # must not queue behind (or hold up) aggregations.
        argv = [*fedmq, "worker", "--queues", "edge", "--hostname", "edge@%h"]
        started.append(Service("edge-worker", argv))
    if o.gateway:
        started.append(Service("gateway", [*fedmq, "gateway"]))
    if o.dashboard:
        started.append(Service("dashboard", [*fedmq, "dashboard"]))
    if o.fleet:
        argv = [*fedmq, "fleet", "--clients", str(o.fleet), "--rounds", str(o.fleet_rounds)]
        started.append(Service("fleet", [*argv, *(["--split"] if o.split else [])], job=True))
    return started


def run(
    settings: Settings,
    logs: Path,
    console: Console,
    options: StackOptions | None = None,
    stop: threading.Event | None = None,
    policy: RestartPolicy | None = None,
) -> int:
    token_env = _preflight(settings, console)
    if token_env is None:
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    logs.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.database_url)  # once, before any service reads the schema
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": settings.broker_url,
        "FEDMQ_DATABASE_URL": settings.database_url,
        **token_env,
    }
    opts = options or StackOptions()
    started = services(opts)
    watch = _metrics(settings, started, env, console)
    if opts.split:
        # A split device's edge link publishes through the broker's default exchange and
        # declares reply queues that per-device users may not (docs/architecture.md,
        # "Decision: split rounds are the platform's").
        console.print(
            "[yellow]--split: devices share the broker URL's user (per-device broker users "
            "do not cover the edge link yet)[/yellow]"
        )
    else:
        _with_broker_users(started, broker_users.prepare(settings, console))
    board = _HealthBoard(settings.database_url)
    for svc in started:
        if svc.job:
            svc.argv = [*svc.argv, "--out", str(logs / svc.name)]
        _spawn(svc, env, logs)
        console.print(f"started {svc.name} (pid {_pid(svc)}), log {logs / svc.name}.log")
        board.write(svc, "running")
    console.print(
        f"broker {settings.broker_url.split('@')[-1]}, database "
        f"{settings.database_url.split('@')[-1]}; Ctrl-C stops everything"
    )
    if opts.gateway:
        console.print(
            f"gateway on http://{settings.gateway_host}:{settings.gateway_port} (OpenAPI at /docs)"
        )
    if opts.dashboard:
        console.print(f"dashboard on http://{settings.dashboard_host}:{settings.dashboard_port}")
    try:
        code = _supervise(
            started, env, logs, console, stop, policy or RestartPolicy(), board, watch
        )
    finally:
        _stop_all(started, console)
        for svc in started:
            board.write(svc, "stopped")
        board.close()
    return code


def _supervise(
    started: list[Service],
    env: dict[str, str],
    logs: Path,
    console: Console,
    stop: threading.Event,
    policy: RestartPolicy,
    board: _HealthBoard,
    watch: Counter | None = None,
) -> int:
    """Restart what exits until ``stop``; returns the exit code of ``fedmq up``."""
    last_board = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        for svc in list(started):
            if svc.proc is None or (svc.proc.poll() is None and svc.restart_at is None):
                continue
            log = logs / f"{svc.name}.log"
            if svc.restart_at is None:  # it just exited
                rc = svc.last_rc = svc.proc.returncode
                if svc.job:
                    console.print(f"{svc.name} finished with {rc}; see {log}")
                    board.write(svc, "exited")
                    started.remove(svc)
                    continue
                svc.exits.append(now)
                if policy.crash_loop(svc.exits, now):
                    n = policy.recent(svc.exits, now)
                    console.print(
                        f"[bold red]GIVING UP: {svc.name} exited {n} times within "
                        f"{policy.crash_loop_window_s:.0f} s (last exit code {rc}): a crash loop, "
                        f"not an accident. Stopping the stack; see {log}[/bold red]"
                    )
                    board.write(svc, "crash-loop")
                    return 1
                delay = policy.delay(policy.recent(svc.exits, now))
                svc.restart_at = now + delay
                console.print(
                    f"[yellow]{svc.name} exited with {rc}; restarting in {delay:.0f} s "
                    f"(restart {svc.restarts + 1}); see {log}[/yellow]"
                )
                board.write(svc, "restarting")
            elif now >= svc.restart_at:
                svc.restart_at = None
                svc.restarts += 1
                if watch is not None:
                    watch.labels(svc.name).inc()
                _spawn(svc, env, logs)
                console.print(f"restarted {svc.name} (pid {_pid(svc)})")
                board.write(svc, "running")
        if now - last_board >= _HealthBoard.PERIOD_S:
            last_board = now
            for svc in started:
                board.write(svc, "restarting" if svc.restart_at is not None else "running")
        stop.wait(0.2)
    return 0


def _metrics(
    settings: Settings, started: list[Service], env: dict[str, str], console: Console
) -> Counter | None:
    """With FEDMQ_METRICS_PORT: serve the stack's own metrics there and give the
    orchestrator and workers the next ports (``metrics_http.UP_OFFSETS``); the gateway
    serves /metrics on its own port. The other children get no port: one that started a
    process of its own (a fleet's worker) would take one of theirs. Returns the restart
    counter (None: no metrics)."""
    env.pop("FEDMQ_METRICS_PORT", None)
    if settings.metrics_port is None:
        return None
    from fedmq import metrics_http

    registry = CollectorRegistry()
    restarts = up_metrics(registry, started)
    base = metrics_http.serve(settings, registry)
    urls = [f"up :{base}"]
    for svc in started:
        offset = metrics_http.UP_OFFSETS.get(svc.name)
        if offset is not None:
            svc.env["FEDMQ_METRICS_PORT"] = str(base + offset)
            urls.append(f"{svc.name} :{base + offset}")
        elif svc.name == "gateway":
            svc.env["FEDMQ_METRICS_PORT"] = str(base)  # on: at /metrics of its own port
            urls.append(f"gateway :{settings.gateway_port}")
    console.print(f"metrics on http://{settings.metrics_host}: " + ", ".join(urls) + " (/metrics)")
    return restarts


def up_metrics(registry: CollectorRegistry, started: list[Service]) -> Counter:
    """The stack's own metrics in ``registry``; returns the restart counter."""
    running = Gauge(
        "fedmq_up_services_running",
        "Services of the stack whose process is running",
        registry=registry,
    )
    running.set_function(
        lambda: sum(1 for x in started if x.proc is not None and x.proc.poll() is None)
    )
    return Counter(
        "fedmq_up_restarts",
        "Services `fedmq up` started again after they exited",
        ["service"],
        registry=registry,
    )


def _pid(svc: Service) -> int:
    return svc.proc.pid if svc.proc else -1


def _with_broker_users(started: list[Service], users: broker_users.BrokerUsers | None) -> None:
    """The orchestrator gives registering devices users of their own; the fleet's devices
    register through the enrollment user (None: both keep the stack's user)."""
    if users is None:
        return
    for svc in started:
        if svc.name == "orchestrator":
            svc.env["FEDMQ_BROKER_ACCOUNTS_URL"] = users.accounts_url
        elif svc.name == "fleet":
            svc.env["FEDMQ_DEVICE_BROKER_URL"] = users.device_broker_url


def _spawn(svc: Service, env: dict[str, str], logs: Path) -> None:
    with (logs / f"{svc.name}.log").open("ab") as log:
        # Own process group: the terminal's Ctrl-C reaches us, and we stop children in order.
        svc.proc = subprocess.Popen(
            svc.argv,
            env={**env, **svc.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class _HealthBoard:
    """The children's rows in ``service_health`` (``up <name>``). Best effort: the stack
    runs without them when the database is away."""

    PERIOD_S = 5.0

    def __init__(self, database_url: str) -> None:
        self._sessions: Any = None
        try:
            self._engine = make_engine(database_url)
            self._sessions = make_sessionmaker(self._engine)
        except Exception:  # a URL the stack refuses later anyway
            self._sessions = None

    def write(self, svc: Service, state: str) -> None:
        if self._sessions is None:
            return
        since = None
        if state in ("restarting", "crash-loop") and svc.exits:
            since = datetime.now(UTC) - timedelta(seconds=time.monotonic() - svc.exits[-1])
        row = HealthRow(
            name=f"up {svc.name}",
            kind="supervised",
            host=host(),
            pid=os.getpid(),
            state=state,
            since=since,
            attempts=len(svc.exits),
            reconnects=svc.restarts,
            detail={"child_pid": _pid(svc), "last_exit_code": svc.last_rc, "job": svc.job},
        )
        with contextlib.suppress(Exception), session_scope(self._sessions) as s:
            record_health(s, row)

    def close(self) -> None:
        if self._sessions is not None:
            self._engine.dispose()


def _preflight(settings: Settings, console: Console) -> dict[str, str] | None:
    """What the services' environment needs beyond the URLs; None (said why) if they
    cannot start."""
    if settings.embedded:
        console.print(
            "[red]fedmq up needs real services: set FEDMQ_BROKER_URL (amqp://...) "
            "and FEDMQ_DATABASE_URL (postgresql+psycopg://...)[/red]"
        )
        return None
    try:
        return operator_env(settings, console)
    except operator_token.TokenError as e:
        console.print(f"[red]{e}[/red]")
        return None


def operator_env(settings: Settings, console: Console) -> dict[str, str]:
    """``FEDMQ_OPERATOR_TOKEN`` for the services: the one set, else the one kept in
    ``<data_dir>/operator-token``, generated (0600) on the first start. Never a value
    printed in fedmq's source: that was how an outsider took over a stack started bare."""
    token = operator_token.require(settings, "fedmq up")
    if token is None:
        path = operator_token.token_path(settings)
        token, made = operator_token.load_or_create(path)
        what = "generated a new operator token in" if made else "operator token from"
        console.print(
            f"{what} {path.resolve()} (mode 0600; `fedmq command` here reads it, "
            "or set FEDMQ_OPERATOR_TOKEN)"
        )
    return {"FEDMQ_OPERATOR_TOKEN": token}


def _stop_all(started: list[Service], console: Console, grace_s: float = 15.0) -> None:
    for svc in reversed(started):
        if svc.proc and svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for svc in reversed(started):
        if svc.proc is None:
            continue
        try:
            svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{svc.name} did not stop within {grace_s:.0f} s; killed[/]")
            # The whole group: a fleet's devices are its children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait()
        console.print(f"stopped {svc.name}")
