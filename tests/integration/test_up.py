"""`fedmq up` starts the orchestrator and a worker natively and stops both on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _wait_for(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.3)
    return False


def test_up_runs_the_stack_and_ctrl_c_stops_every_process(
    tmp_path: Path, amqp_url: str, pg_url: str
) -> None:
    env = {**os.environ, "FEDMQ_BROKER_URL": amqp_url, "FEDMQ_DATABASE_URL": pg_url}
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmq.cli", "up", "--logs", str(logs)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_for(logs / "worker.log", "ready", 60), (logs / "worker.log").read_text()
        assert _wait_for(logs / "orchestrator.log", "orchestrator started", 60), (
            logs / "orchestrator.log"
        ).read_text()
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopped orchestrator" in out and "stopped worker" in out
    pids = [
        int(line.split("pid ")[1].split(")")[0]) for line in out.splitlines() if "(pid " in line
    ]
    assert len(pids) == 2
    for pid in pids:  # every child is gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_up_refuses_the_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "up", "--logs", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "needs real services" in done.stdout
