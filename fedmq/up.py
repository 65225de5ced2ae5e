"""``fedmq up``: the full stack as native processes, for machines without Docker.

Starts the orchestrator and a worker (the dashboard and gateway join when they exist)
against the configured RabbitMQ and database, each logging to ``<logs>/<name>.log``;
Ctrl-C or SIGTERM stops them all, and a service that dies takes the others down with it.
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

from fedmq.settings import Settings


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None


def services(worker_queues: str) -> list[Service]:
    fedmq = [sys.executable, "-m", "fedmq.cli"]
    return [
        Service("orchestrator", [*fedmq, "orchestrator"]),
        Service("worker", [*fedmq, "worker", "--queues", worker_queues]),
    ]


def run(
    s: Settings,
    logs: Path,
    console: Console,
    worker_queues: str = "aggregate,evaluate",
    stop: threading.Event | None = None,
) -> int:
    if s.embedded:
        console.print(
            "[red]fedmq up needs real services: set FEDMQ_BROKER_URL (amqp://...) "
            "and FEDMQ_DATABASE_URL (postgresql+psycopg://...)[/red]"
        )
        return 2
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FEDMQ_BROKER_URL": s.broker_url, "FEDMQ_DATABASE_URL": s.database_url}
    started = services(worker_queues)
    for svc in started:
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
    code = 0
    while not stop.is_set():
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
