"""A broker outage, scoped: the orchestrator, a Celery worker and a fleet of real
``fedmq device`` processes reach RabbitMQ through a TCP proxy that the test cuts (every
connection reset, new ones refused) while a round is open. The shared broker itself is
never touched.

Issue 17: during an outage of a few minutes the orchestrator's consumers gave up after 20
attempts and the process exited, the worker died too, and the open round stayed open 46
minutes past its deadline. Now every process must outlive the outage and the open round
must be done within one deadline of the broker's return.

``FEDMQ_BROKER_OUTAGE_S`` sets the outage (default 12 s, with fast reconnect backoff so
that it spans far more attempts than the old cap of 20: the CI version). From 60 s on the
processes keep the default backoff (0.5 s doubling to 10 s) and rounds a 60 s deadline:
``FEDMQ_BROKER_OUTAGE_S=180`` is the issue's acceptance run (benchmarks/reliability.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from db import queries as q
from db.queries.health import list_health
from protocol.messages import RoundState
from tests.faults.support import scenario
from tests.integration.orchestrator_harness import harness
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

OUTAGE_S = float(os.environ.get("FEDMQ_BROKER_OUTAGE_S", "12"))
LONG = OUTAGE_S >= 60
DEADLINE_S = 60.0 if LONG else 30.0
ROUNDS = 4


def _health(h, kind: str) -> list:  # type: ignore[no-untyped-def]
    def get(s):  # type: ignore[no-untyped-def]
        rows = [r for r in list_health(s) if r.kind == kind]
        for r in rows:
            s.expunge(r)
        return rows

    return list(h.read(get))


@pytest.mark.timeout(int(OUTAGE_S + 3 * DEADLINE_S + 400))
def test_every_service_outlives_a_broker_outage_and_the_open_round_finishes(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    _, tally = scenario("broker-outage", f"broker outage of {OUTAGE_S:.0f} s (proxy cut)")
    proxy = TcpProxy.for_url(amqp_url)
    behind = proxy.url(amqp_url)
    env = {
        "FEDMQ_BROKER_URL": behind,
        "FEDMQ_HEARTBEAT_INTERVAL_S": "1",
        # CI: ~0.2 s between attempts, so 12 s is some 40 attempts per connection.
        "FEDMQ_RECONNECT_BACKOFF_S": "0.5" if LONG else "0.05",
        "FEDMQ_RECONNECT_BACKOFF_MAX_S": "10" if LONG else "0.4",
    }
    try:
        with harness(amqp_url, pg_url, tmp_path, worker=False) as h:
            worker = h.procs.worker(env=env)
            orch = h.procs.orchestrator(env=env)
            fleet = h.procs.start(
                "fleet",
                *("-m", "fedmq.cli", "fleet", "--clients", "2", "--rounds", str(ROUNDS)),
                *("--deadline", str(DEADLINE_S), "--out", str(tmp_path / "fleet")),
                # Every round takes a few seconds of "training": the cut finds it open.
                *("--slow-fraction", "1", "--slowdown", "3"),
                env=env,
            )
            h.wait(lambda: bool(h.read(q.list_runs)), 120, "the fleet's run")
            h.run_id = h.read(lambda s: q.list_runs(s)[0].id)
            h.wait_round_state(1, {"done"}, 240)
            h.wait_round_state(2, {"open"}, 60)

            proxy.cut()
            cut = time.monotonic()
            time.sleep(OUTAGE_S / 2)
            h.wait(
                lambda: any(r.state == "reconnecting" for r in _health(h, "orchestrator")),
                OUTAGE_S,
                "the orchestrator's health row to say it reconnects",
            )
            time.sleep(max(0.0, cut + OUTAGE_S - time.monotonic()))
            alive = {n: p.poll() is None for n, p in [("orch", orch), ("worker", worker)]}
            during = _health(h, "orchestrator")
            refused = proxy.refused
            proxy.restore()
            back = time.monotonic()

            assert alive == {"orch": True, "worker": True}, h.procs.output()
            assert fleet.poll() is None, h.procs.output()
            assert refused > 20, "the outage must span more attempts than the old cap"
            assert h.round(2) is not None and h.round(2).state == RoundState.OPEN  # type: ignore[union-attr]
            (row,) = during
            assert row.state == "reconnecting" and row.attempts > 0

            h.wait_round_state(2, {"done"}, DEADLINE_S)
            tally.recovery_s.append(round(time.monotonic() - back, 2))
            for k in range(3, ROUNDS + 1):
                h.wait_round_state(k, {"done"}, 2 * DEADLINE_S)
            h.wait(lambda: fleet.poll() is not None, 60, "the fleet to finish")
            assert fleet.returncode == 0, h.procs.output()
            assert orch.poll() is None and worker.poll() is None, h.procs.output()
            h.wait(
                lambda: [r.state for r in _health(h, "orchestrator")] == ["connected"],
                20,
                "the orchestrator's row to read connected",
            )
            (row,) = _health(h, "orchestrator")
            assert row.reconnects >= 1 and row.detail["broker_outages"] >= 1
            workers = _health(h, "worker")
            assert workers and all(r.state == "connected" for r in workers)
            failed = [r for r in h.rounds() if r.state == RoundState.FAILED]
            tally.runs, tally.sent = 1, 2 * ROUNDS
            tally.acknowledged = tally.stored = tally.aggregated = sum(
                r.received for r in h.rounds() if r.state == RoundState.DONE
            )
            log = (tmp_path / "orchestrator.log").read_text(errors="replace")
            attempts = log.count("reconnect attempt")
            assert attempts > 20
            assert "Traceback" not in log, "one line per attempt, no traceback"
            assert not failed
    finally:
        proxy.close()
    tally.write()
    print(
        f"outage {OUTAGE_S:.0f} s: {refused} connection attempts refused, "
        f"{attempts} orchestrator reconnect lines; round 2 done "
        f"{tally.recovery_s[0]:.1f} s after the broker came back (deadline {DEADLINE_S:.0f} s)"
    )
