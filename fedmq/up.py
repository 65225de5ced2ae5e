"""``fedmq up``: the full stack as native processes, for machines without Docker.

Migrates the database, then starts the orchestrator, a worker, the REST gateway and the
dashboard (the same services as docker-compose.yml) against the configured RabbitMQ and
database, each logging to ``<logs>/<name>.log``; optionally a fleet of simulated devices.
Ctrl-C or SIGTERM stops them all, and a service that dies takes the others down with it.
The fleet is a job, not a service: when it has run its rounds it exits and the stack stays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from db import migrations
from fedmq import operator_token
from fedmq.settings import Settings


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    job: bool = False  # may exit when done without taking the stack down


@dataclass(frozen=True)
class StackOptions:
    worker_queues: str = "aggregate,evaluate"
    gateway: bool = True
    dashboard: bool = True
    fleet: int = 0  # devices; 0: none
    fleet_rounds: int = 0  # autorun rounds the fleet starts (0: the operator starts them)


def services(o: StackOptions) -> list[Service]:
    fedmq = [sys.executable, "-m", "fedmq.cli"]
    started = [
        Service("orchestrator", [*fedmq, "orchestrator"]),
        Service("worker", [*fedmq, "worker", "--queues", o.worker_queues]),
    ]
    if o.gateway:
        started.append(Service("gateway", [*fedmq, "gateway"]))
    if o.dashboard:
        started.append(Service("dashboard", [*fedmq, "dashboard"]))
    if o.fleet:
        argv = [*fedmq, "fleet", "--clients", str(o.fleet), "--rounds", str(o.fleet_rounds)]
        started.append(Service("fleet", argv, job=True))
    return started


def run(
    s: Settings,
    logs: Path,
    console: Console,
    options: StackOptions | None = None,
    stop: threading.Event | None = None,
) -> int:
    token_env = _preflight(s, console)
    if token_env is None:
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    logs.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(s.database_url)  # once, before any service reads the schema
    env = {
        **os.environ,
        "FEDMQ_BROKER_URL": s.broker_url,
        "FEDMQ_DATABASE_URL": s.database_url,
        **token_env,
    }
    opts = options or StackOptions()
    started = services(opts)
    for svc in started:
        if svc.job:
            svc.argv = [*svc.argv, "--out", str(logs / svc.name)]
        log = (logs / f"{svc.name}.log").open("ab")
        # Own process group: the terminal's Ctrl-C reaches us, and we stop children in order.
        svc.proc = subprocess.Popen(
            svc.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        console.print(f"started {svc.name} (pid {svc.proc.pid}), log {logs / svc.name}.log")
    console.print(
        f"broker {s.broker_url.split('@')[-1]}, database "
        f"{s.database_url.split('@')[-1]}; Ctrl-C stops everything"
    )
    if opts.gateway:
        console.print(f"gateway on http://{s.gateway_host}:{s.gateway_port} (OpenAPI at /docs)")
    if opts.dashboard:
        console.print(f"dashboard on http://{s.dashboard_host}:{s.dashboard_port}")
    code = 0
    while not stop.is_set():
        for svc in [x for x in started if x.job and x.proc and x.proc.poll() is not None]:
            rc = svc.proc.returncode if svc.proc else None
            console.print(f"{svc.name} finished with {rc}; see {logs / svc.name}.log")
            started.remove(svc)
        dead = [svc for svc in started if svc.proc and svc.proc.poll() is not None]
        if dead:
            for svc in dead:
                rc = svc.proc.returncode if svc.proc else None
                console.print(f"[red]{svc.name} exited with {rc}; see {logs / svc.name}.log[/red]")
            code = 1
            break
        stop.wait(0.5)
    _stop_all(started, console)
    return code


def _preflight(s: Settings, console: Console) -> dict[str, str] | None:
    """What the services' environment needs beyond the URLs; None (said why) if they
    cannot start."""
    if s.embedded:
        console.print(
            "[red]fedmq up needs real services: set FEDMQ_BROKER_URL (amqp://...) "
            "and FEDMQ_DATABASE_URL (postgresql+psycopg://...)[/red]"
        )
        return None
    try:
        return operator_env(s, console)
    except operator_token.TokenError as e:
        console.print(f"[red]{e}[/red]")
        return None


def operator_env(s: Settings, console: Console) -> dict[str, str]:
    """``FEDMQ_OPERATOR_TOKEN`` for the services: the one set, else the one kept in
    ``<data_dir>/operator-token``, generated (0600) on the first start. Never a value
    printed in fedmq's source: that was how an outsider took over a stack started bare."""
    token = operator_token.require(s, "fedmq up")
    if token is None:
        path = operator_token.token_path(s)
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
            svc.proc.kill()
            svc.proc.wait()
        console.print(f"stopped {svc.name}")
