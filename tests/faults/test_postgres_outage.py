"""Postgres connections cut during ingest.

A real ``pg_ctlcluster ... restart`` would also cut every other test using the shared local
server, so this scenario does what such a restart does to *this* test's processes: every
backend connected to the test's database is terminated (``pg_terminate_backend``), several
times at random points while updates are being staged and stored. The orchestrator and the
worker must carry on by themselves, and the invariant must hold."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from orchestrator.state import RoundPolicy
from protocol.messages import CommandAction
from tests.faults.invariants import Invariants
from tests.faults.support import acked, runs, scenario, wait_acked, wait_ready
from tests.integration.orchestrator_harness import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

TERMINATE = text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@pytest.mark.timeout(60 + 40 * runs(2))
def test_services_ride_out_terminated_database_connections(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    r, tally = scenario("postgres", "Postgres connections terminated during ingest")
    n = runs(2)
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with harness(amqp_url, pg_url, tmp_path) as h:
            h.create_run(RoundPolicy(min_clients=4, quorum_fraction=1.0, deadline_s=60))
            inv = Invariants(h.sessions, h.run_id)
            orch = h.procs.orchestrator()
            clients = [
                h.client(f"c{i}", chunk_size=64, chunk_delay_s=0.03, train_s=r.uniform(0.1, 0.8))
                for i in range(4)
            ]
            wait_ready(h, clients)
            h.command(CommandAction.AUTORUN, rounds=n)
            terminated = 0
            for k in range(1, n + 1):
                _retrying(lambda k=k: h.wait_round_state(k, {"open"}, 40))
                cut = 0.0
                for _ in range(3):  # three outages spread over the uploads
                    time.sleep(r.uniform(0.1, 0.6))
                    with admin.connect() as conn:
                        terminated += int(conn.execute(TERMINATE).scalar() or 0)
                    cut = time.monotonic()
                h.sessions.kw["bind"].dispose()  # the harness's own pooled connections died too
                _retrying(lambda k=k: h.wait_round_state(k, {"done"}, 60))
                tally.recovery_s.append(round(time.monotonic() - cut, 2))
                inv.verify()
                tally.runs += 1
            assert terminated >= 3 * n, f"only {terminated} connections terminated"
            assert orch.poll() is None, "the orchestrator died instead of reconnecting"
            wait_acked(h, clients, 4 * n)
            ids = acked(clients)
            tally.stored = inv.check(ids)
            tally.sent = sum(len(c.sent) for c in clients)
            tally.acknowledged, tally.aggregated = len(set(ids)), inv.stored
    finally:
        admin.dispose()
    tally.write()
    assert tally.stored == tally.sent == 4 * n


def _retrying(fn, attempts: int = 3):  # type: ignore[no-untyped-def]
    """The test's own reads may meet a connection the outage killed: one more try."""
    for i in range(attempts):
        try:
            return fn()
        except OperationalError:
            if i == attempts - 1:
                raise
            time.sleep(0.5)
    return None
