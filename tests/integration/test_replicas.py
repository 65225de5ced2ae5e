"""Run leases against a real database (SQLite and Postgres): claim, renewal, expiry, the fair
share, hand-over on stop, atomic claims; on Postgres, a replica whose connection is gone is
dead at once, and the owner hears of updates another process stored.

Each ``Leases`` stands for one orchestrator process. They are started with ``renew=False``
and renewed by hand, so each step of a hand-over is seen in order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Replica, RunLease
from db.queries import leases as lq
from db.queries import orchestrator as oq
from orchestrator.replicas import Leases
from orchestrator.runs import create_run
from protocol.codec import Encoding, encode

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    migrations.upgrade(pg_url)
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def replicas() -> Iterator[Callable[..., Leases]]:
    made: list[Leases] = []

    def make(sessions: sessionmaker[Session], name: str, **kw: Any) -> Leases:
        leases = Leases(sessions, replica_id=name, **kw)
        leases.start(renew=False)
        made.append(leases)
        return leases

    yield make
    for leases in made:
        leases.stop()


def runs(sessions: sessionmaker[Session], n: int) -> list[str]:
    model = encode({"w": np.zeros(4, np.float32)}, Encoding.FP32)
    with session_scope(sessions) as s:
        return sorted(create_run(s, f"run-{i}-{time.time_ns()}", model) for i in range(n))


def holders(sessions: sessionmaker[Session]) -> dict[str, str]:
    with session_scope(sessions) as s:
        return lq.lease_holders(s)


def expiries(sessions: sessionmaker[Session], replica_id: str) -> dict[str, Any]:
    with session_scope(sessions) as s:
        rows = s.query(RunLease).filter(RunLease.replica_id == replica_id).all()
        return {r.run_id: r.expires_at for r in rows}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_a_second_replica_gets_half_the_runs_and_both_then_stay(
    sessions: sessionmaker[Session], replicas: Callable[..., Leases]
) -> None:
    ids = runs(sessions, 4)
    a = replicas(sessions, "a")
    assert a.owned() == frozenset(ids)
    b = replicas(sessions, "b")
    assert b.owned() == frozenset()  # nothing free yet: a holds everything, validly
    lost = a.refresh().lost  # b is short of its share: a hands back two
    assert len(lost) == 2 and a.owned() == frozenset(ids) - lost
    assert b.refresh().gained == lost
    for _ in range(3):
        assert a.refresh().gained == a.refresh().lost == frozenset()
        assert b.refresh().gained == b.refresh().lost == frozenset()
    assert holders(sessions) == {**dict.fromkeys(a.owned(), "a"), **dict.fromkeys(b.owned(), "b")}
    assert sorted(holders(sessions)) == ids


def test_renewal_extends_a_lease_and_one_left_unrenewed_moves(
    sessions: sessionmaker[Session], replicas: Callable[..., Leases]
) -> None:
    ids = runs(sessions, 3)
    a = replicas(sessions, "a", ttl_s=1.0, renew_s=0.2)
    first = expiries(sessions, "a")
    a.refresh()
    assert all(t > first[r] for r, t in expiries(sessions, "a").items())
    b = replicas(sessions, "b", ttl_s=1.0, renew_s=0.2)
    # a stops renewing (hung, its connection still open): its leases expire, b takes them.
    wait_for(lambda: b.refresh().gained == frozenset(ids) or b.owned() == frozenset(ids), "b")
    assert holders(sessions) == dict.fromkeys(ids, "b")
    assert a.owned() == frozenset()  # past its lease a does no owner work any more
    lost_back = a.refresh()  # back again: a finds its leases gone, then gets its share
    assert lost_back.gained == frozenset()
    b.refresh()
    a.refresh()
    assert len(a.owned()) + len(b.owned()) == 3 and len(a.owned()) >= 1


def test_a_stopped_replica_hands_its_runs_over_at_the_next_renewal(
    sessions: sessionmaker[Session], replicas: Callable[..., Leases]
) -> None:
    ids = runs(sessions, 4)
    a = replicas(sessions, "a", ttl_s=60.0)
    b = replicas(sessions, "b", ttl_s=60.0)
    a.refresh()
    b.refresh()
    assert len(a.owned()) == len(b.owned()) == 2
    a.stop()
    with session_scope(sessions) as s:
        assert s.get(Replica, "a") is None
    assert set(holders(sessions).values()) == {"b"}
    assert b.refresh().gained == frozenset(ids) - b.owned() or b.owned() == frozenset(ids)
    assert holders(sessions) == dict.fromkeys(ids, "b")


def test_two_replicas_claiming_one_run_at_once_get_it_once(
    sessions: sessionmaker[Session],
) -> None:
    (run_id,) = runs(sessions, 1)
    got: dict[str, set[str]] = {}
    with session_scope(sessions) as s:
        now = lq.db_now(s)
        got["a"] = lq.claim_leases(s, "a", [run_id], now, lq.expiry(now, 60))

        def other() -> None:
            # Blocks on a's uncommitted row (Postgres) or write lock (SQLite) until a
            # commits, then finds a fresh lease: takes nothing.
            with session_scope(sessions) as s2:
                now2 = lq.db_now(s2)
                got["b"] = lq.claim_leases(s2, "b", [run_id], now2, lq.expiry(now2, 60))

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
    t.join(timeout=60)
    assert got == {"a": {run_id}, "b": set()}
    assert holders(sessions) == {run_id: "a"}


def test_a_replica_whose_connection_is_gone_is_dead_at_once_on_postgres(
    pg_sessions: sessionmaker[Session], replicas: Callable[..., Leases]
) -> None:
    ids = runs(pg_sessions, 4)
    a = replicas(pg_sessions, "a", ttl_s=300.0)
    b = replicas(pg_sessions, "b", ttl_s=300.0)
    assert a.owned() == frozenset(ids) and b.owned() == frozenset()
    # What SIGKILL does from Postgres's side: a's session ends, its advisory lock with it.
    a._listener.stop()
    # Far inside a's 300 s leases, b's next renewal takes every run.
    assert b.refresh().gained == frozenset(ids)
    assert holders(pg_sessions) == dict.fromkeys(ids, "b")


def test_the_owner_hears_at_once_of_an_update_another_process_stored(
    pg_sessions: sessionmaker[Session], replicas: Callable[..., Leases]
) -> None:
    runs(pg_sessions, 2)
    heard: list[str] = []
    a = replicas(pg_sessions, "a", on_inbox=heard.append)
    b = replicas(pg_sessions, "b")
    a.refresh()
    b.refresh()
    ((mine,), (other,)) = a.owned(), b.owned()
    for run_id in (other, mine):
        with session_scope(pg_sessions) as s:
            oq.put_inbox(
                s,
                [
                    {
                        "run_id": run_id,
                        "round": 1,
                        "client_id": "c1",
                        "message_id": f"m-{run_id}",
                        "update_sha": "0" * 64,
                        "num_samples": 1,
                        "bytes": 1,
                        "metrics": {},
                    }
                ],
            )
    wait_for(lambda: mine in heard, "the notification")
    time.sleep(0.3)
    assert other not in heard  # not its run: another replica counts it
