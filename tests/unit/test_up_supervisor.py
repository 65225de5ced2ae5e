"""`fedmq up`'s supervision, on real child processes (tiny Python ones): a child that exits
is started again after a growing delay, a crash loop stops the stack loudly, a job that
finishes is let go, and each state is written for the dashboard."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedmq.up import RestartPolicy, Service, _spawn, _stop_all, _supervise


class Board:
    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []

    def write(self, svc: Service, state: str) -> None:
        self.states.append((svc.name, state))


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _run(services: list[Service], tmp_path: Path, policy: RestartPolicy, stop: threading.Event):
    console = Console(record=True, width=200)
    board = Board()
    env = dict(os.environ)
    for svc in services:
        _spawn(svc, env, tmp_path)
    result: dict[str, int] = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "code", _supervise(services, env, tmp_path, console, stop, policy, board)
        )
    )
    t.start()
    return t, result, console, board


def test_the_backoff_grows_per_recent_exit_and_is_capped() -> None:
    p = RestartPolicy(backoff_s=1, backoff_max_s=30, crash_loop_exits=5, crash_loop_window_s=60)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5, 6, 9)] == [1, 2, 4, 8, 16, 30, 30]
    assert p.recent([0.0, 50.0, 100.0], now=100.0) == 2  # the first is out of the window
    assert not p.crash_loop([0.0, 70.0, 80.0, 90.0, 100.0], now=120.0)
    assert p.crash_loop([70.0, 80.0, 90.0, 100.0, 110.0], now=120.0)


def test_a_killed_child_comes_back_and_a_finished_job_is_let_go(tmp_path: Path) -> None:
    policy = RestartPolicy(backoff_s=0.2, backoff_max_s=1.0, crash_loop_exits=5)
    svc = Service("orchestrator", _py("import time; time.sleep(60)"))
    job = Service("fleet", _py("print('done')"), job=True)
    stop = threading.Event()
    t, result, console, board = _run([svc, job], tmp_path, policy, stop)
    try:
        assert svc.proc is not None
        first = svc.proc.pid
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (svc.proc.pid == first or svc.restart_at is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.proc.pid != first and svc.proc.poll() is None
        assert svc.restarts == 1
    finally:
        stop.set()
        t.join(10)
        _stop_all([svc], console, grace_s=5)
    assert result["code"] == 0
    out = console.export_text()
    assert "orchestrator exited with -9; restarting in" in out
    assert f"restarted orchestrator (pid {svc.proc.pid})" in out
    assert "fleet finished with 0" in out
    assert ("orchestrator", "restarting") in board.states
    assert ("orchestrator", "running") in board.states and ("fleet", "exited") in board.states


def test_a_crash_loop_gives_up_loudly_instead_of_restarting_for_ever(tmp_path: Path) -> None:
    policy = RestartPolicy(backoff_s=0.05, backoff_max_s=0.1, crash_loop_exits=3)
    crashing = Service("worker", _py("import sys; sys.exit(3)"))
    t, result, console, board = _run([crashing], tmp_path, policy, threading.Event())
    t.join(20)
    assert not t.is_alive()
    assert result["code"] == 1
    assert crashing.restarts == 2  # started 3 times in all, exited 3 times
    out = console.export_text()
    assert "GIVING UP: worker exited 3 times" in out and "crash loop" in out
    assert board.states[-1] == ("worker", "crash-loop")


@pytest.mark.timeout(30)
def test_stopping_is_bounded_even_for_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = Service(
        "gateway",
        _py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"),
    )
    _spawn(stubborn, dict(os.environ), tmp_path)
    time.sleep(0.5)  # let it install its handler
    began = time.monotonic()
    _stop_all([stubborn], Console(record=True), grace_s=1.0)
    assert time.monotonic() - began < 5
    assert stubborn.proc is not None and stubborn.proc.returncode == -signal.SIGKILL
