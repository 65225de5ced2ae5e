"""Engines and sessions. Nothing here runs at import time: callers build an engine from
the URL they were configured with, and open a session at their boundary (a request, a
task, one turn of a consumer loop), passing it down to the query functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3, the driver fedmq ships with."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True, **kw: Any) -> Engine:
    """Build an engine configured for fedmq on SQLite or Postgres.

    ``sqlite_foreign_keys=False`` is for migrations only: SQLite batch migrations rebuild a
    table by dropping it, which with foreign keys on would fire ON DELETE CASCADE and
    empty every table that references it.
    """
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, foreign_keys=sqlite_foreign_keys, **kw)
    kw.setdefault("pool_pre_ping", True)
    return create_engine(u, **kw)


def _sqlite_engine(u: URL, *, foreign_keys: bool, **kw: Any) -> Engine:
    memory = u.database in (None, "", ":memory:")
    if memory:
        # One shared connection, or every session would see its own empty database.
        kw.setdefault("poolclass", StaticPool)
        kw.setdefault("connect_args", {"check_same_thread": False})
    else:
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    engine = create_engine(u, **kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling skips BEGIN before SELECTs and breaks
        # SAVEPOINT; take it over (the recipe in SQLAlchemy's SQLite dialect docs).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not memory:
            # WAL: the dashboard's reads do not block the orchestrator's writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
        # instead of one failing with "database is locked" when it upgrades a read lock.
        # WAL readers in other processes are not blocked by it.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: callers return rows out of their session scope.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back if it raises."""
    factory = engine if isinstance(engine, sessionmaker) else make_sessionmaker(engine)
    with factory() as session, session.begin():
        yield session
