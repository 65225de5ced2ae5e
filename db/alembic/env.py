"""Alembic environment: finds the URL, imports every model, runs the migrations.

The URL comes from, in order: a connection handed over in ``config.attributes``, the
``url`` attribute (db.migrations), ``alembic -x url=...``, ``sqlalchemy.url`` in an ini
file, and ``FEDMQ_DATABASE_URL``. Runs only inside alembic, so it may build an engine.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, text

from db.engine import make_engine
from db.models import Base

config = context.config
target_metadata = Base.metadata

# Any constant works; it only keeps two processes (say orchestrator and a worker starting
# together) from running the same migration at once on Postgres.
_PG_MIGRATION_LOCK = 0x66656D71  # "femq"


def _url() -> str:
    url = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("FEDMQ_DATABASE_URL")
    )
    if not url:
        raise RuntimeError(
            "no database URL: pass -x url=..., set FEDMQ_DATABASE_URL, or use db.migrations"
        )
    return str(url)


# Celery's database result backend creates these in the same database; they are not ours.
_FOREIGN_TABLES = frozenset({"celery_taskmeta", "celery_tasksetmeta"})


def _include_object(obj: object, name: str | None, type_: str, reflected: bool, _: object) -> bool:
    return not (type_ == "table" and name in _FOREIGN_TABLES)


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=bool(dialect and str(dialect).startswith("sqlite")),
        compare_type=True,
        include_object=_include_object,
        literal_binds=connection is None,
    )


def run_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


def run_online() -> None:
    given: Connection | None = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    engine = make_engine(_url(), sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
