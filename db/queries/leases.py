"""Replicas and run leases (``orchestrator.replicas``): heartbeats, renewal, atomic claims,
hand-back; and the Postgres notifications and session locks that make hand-over prompt.

Times are the database's (``db_now``), not each replica's: one clock judges every lease,
whatever the hosts' clocks say.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, or_, select, text, update
from sqlalchemy.orm import Session

from db.models import Replica, RunLease, utcnow
from db.queries._sql import changed, dialect_insert

# Channels of Postgres notifications: an update stored for a run (payload: the run id), for
# its lease holder to count it at once; leases handed back or a replica come or gone
# (payload: the replica id), for the others to look again at once.
INBOX_CHANNEL = "fedmq_inbox"
LEASES_CHANNEL = "fedmq_leases"

# The first key of every replica's session-level advisory lock (ASCII "fedq"); the second
# is from its id. Held on the replica's listening connection, so it lasts exactly as long as
# that connection: a killed process's lock is gone the moment Postgres sees its socket close.
_LOCK_CLASS = 0x66656471


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def db_now(session: Session) -> datetime:
    """The database's clock (Postgres: ``clock_timestamp()``, not the transaction's start).
    SQLite lives in one process on one host: its clock is this one."""
    if is_postgres(session):
        now = session.scalar(select(text("clock_timestamp()")))
        assert isinstance(now, datetime)
        return now
    return utcnow()


def replica_lock_key(replica_id: str) -> int:
    """The second key of ``replica_id``'s advisory lock (31 bits of a hash of it)."""
    return int.from_bytes(hashlib.sha256(replica_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def replica_lock_sql(replica_id: str) -> tuple[str, dict[str, int]]:
    """The statement (and its parameters) that takes ``replica_id``'s session lock, for the
    caller's listening connection (a raw driver connection, not a Session)."""
    return (
        "SELECT pg_try_advisory_lock(%(k1)s, %(k2)s)",
        {"k1": _LOCK_CLASS, "k2": replica_lock_key(replica_id)},
    )


def connected_replicas(session: Session) -> set[int] | None:
    """Lock keys (``replica_lock_key``) of the replicas whose session lock is held, i.e.
    whose connection is open; None where the database cannot tell (SQLite)."""
    if not is_postgres(session):
        return None
    rows = session.scalars(
        text(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = :k1 AND objsubid = 2"
        ),
        {"k1": _LOCK_CLASS},
    )
    return {int(k) for k in rows}


def notify(session: Session, channel: str, payloads: Iterable[str]) -> None:
    """Postgres: send ``payloads`` on ``channel`` when this transaction commits (nothing if
    it rolls back; one of each payload however often it is sent). Elsewhere nothing: SQLite
    is one process, which wakes its own threads."""
    unique = sorted(set(payloads))
    if unique and is_postgres(session):
        session.execute(
            text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": channel, "payloads": unique},
        )


# --- replicas -------------------------------------------------------------------------------


def heartbeat(session: Session, replica_id: str, now: datetime, info: dict[str, Any]) -> bool:
    """Mark ``replica_id`` seen at ``now`` (its row made if new); True if it was new."""
    table = cast(Table, Replica.__table__)
    ins = dialect_insert(session.get_bind().dialect.name, table).values(
        id=replica_id, started_at=now, seen_at=now, info=info
    )
    stmt = ins.on_conflict_do_update(
        index_elements=["id"], set_={"seen_at": now, "info": ins.excluded.info}
    ).returning(table.c.started_at)
    started = session.scalar(stmt)
    return bool(started == now)


def live_replicas(session: Session, since: datetime) -> list[Replica]:
    """Replicas seen at or after ``since``."""
    stmt = select(Replica).where(Replica.seen_at >= since).order_by(Replica.id)
    return list(session.scalars(stmt))


def forget_replicas(session: Session, before: datetime) -> int:
    """Drop the rows of replicas not seen since ``before`` (long gone)."""
    return changed(session, delete(Replica).where(Replica.seen_at < before))


def forget_replica(session: Session, replica_id: str) -> None:
    session.execute(delete(Replica).where(Replica.id == replica_id))


# --- leases ---------------------------------------------------------------------------------


def leases(session: Session) -> list[RunLease]:
    return list(session.scalars(select(RunLease).order_by(RunLease.run_id)))


def renew_leases(session: Session, replica_id: str, until: datetime) -> set[str]:
    """Extend every lease ``replica_id`` still holds to ``until``; returns their runs (a
    lease another replica claimed after it expired is no longer among them)."""
    stmt = (
        update(RunLease)
        .where(RunLease.replica_id == replica_id)
        .values(expires_at=until)
        .returning(RunLease.run_id)
    )
    return set(session.scalars(stmt))


def claim_leases(
    session: Session,
    replica_id: str,
    run_ids: Collection[str],
    now: datetime,
    until: datetime,
    *,
    dead: Collection[str] = (),
) -> set[str]:
    """Take the leases of ``run_ids`` that nobody holds, that expired before ``now`` or
    whose holder is one of ``dead``; returns the runs taken. One conditional upsert: of two
    replicas claiming one run at once, the second finds the first's fresh lease (Postgres
    re-checks the condition on the row the first committed) and takes nothing."""
    if not run_ids:
        return set()
    table = cast(Table, RunLease.__table__)
    rows = [
        {"run_id": r, "replica_id": replica_id, "expires_at": until, "acquired_at": now}
        for r in sorted(run_ids)
    ]
    ins = dialect_insert(session.get_bind().dialect.name, table).values(rows)
    claimable = table.c.expires_at < now
    if dead:
        claimable = or_(claimable, table.c.replica_id.in_(sorted(dead)))
    stmt = ins.on_conflict_do_update(
        index_elements=["run_id"],
        set_={
            "replica_id": ins.excluded.replica_id,
            "expires_at": ins.excluded.expires_at,
            "acquired_at": ins.excluded.acquired_at,
        },
        where=claimable,
    ).returning(table.c.run_id)
    return set(session.scalars(stmt))


def release_leases(
    session: Session, replica_id: str, run_ids: Collection[str] | None = None
) -> int:
    """Hand back ``replica_id``'s leases of ``run_ids`` (None: all of them)."""
    stmt = delete(RunLease).where(RunLease.replica_id == replica_id)
    if run_ids is not None:
        if not run_ids:
            return 0
        stmt = stmt.where(RunLease.run_id.in_(sorted(run_ids)))
    return changed(session, stmt)


def lease_holders(session: Session) -> dict[str, str]:
    """Run id -> replica id of every lease, expired or not (for tests and benchmarks)."""
    return {r: rep for r, rep in session.execute(select(RunLease.run_id, RunLease.replica_id))}


def expiry(now: datetime, ttl_s: float) -> datetime:
    return now + timedelta(seconds=ttl_s)
