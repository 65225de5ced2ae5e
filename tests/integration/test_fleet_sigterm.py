"""`fedmq fleet` stops within 15 s of SIGTERM in the middle of an autorun, and takes its
device processes with it (issue 17: it went on training for 7 minutes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from db import queries as q
from tests.integration.orchestrator_harness import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too: exited, waiting for a parent that is itself gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1].startswith("Z")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fleet_exits_within_15_s_of_a_signal_during_autorun(
    amqp_url: str, pg_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    with harness(amqp_url, pg_url, tmp_path) as h:
        h.procs.orchestrator()
        fleet = h.procs.start(
            "fleet",
            *("-m", "fedmq.cli", "fleet", "--clients", "2", "--rounds", "100"),
            *("--out", str(tmp_path / "fleet")),
            env={"FEDMQ_HEARTBEAT_INTERVAL_S": "1"},
        )
        h.wait(lambda: bool(h.read(q.list_runs)), 120, "the fleet's run")
        h.run_id = h.read(lambda s: q.list_runs(s)[0].id)
        h.wait_round_state(1, {"done"}, 240)
        devices = _children(fleet.pid)
        assert len(devices) == 2
        fleet.send_signal(sig)
        began = time.monotonic()
        rc = fleet.wait(timeout=30)
        took = time.monotonic() - began
        assert took < 15, f"fleet took {took:.1f} s to stop"
        assert rc == 0, h.procs.output()
        assert all(_gone(d) for d in devices), "a device outlived its fleet"
        assert "fleet stopped" in (tmp_path / "fleet.log").read_text()
        rounds = h.rounds()
        assert len([r for r in rounds if str(r.state) == "done"]) < 100
