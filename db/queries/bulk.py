"""Bulk inserts: many rows of one table in one executemany (SQLAlchemy's insertmanyvalues
batches them into multi-row INSERTs). For seeding large databases (benchmarks, demos) where
the per-row idempotent writes of the other modules would take minutes; nothing in the
orchestrator's path uses it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from db.models import Base

BATCH = 5_000


def insert_rows(
    session: Session, model: type[Base], rows: Iterable[Mapping[str, Any]], batch: int = BATCH
) -> int:
    """Insert ``rows`` (column -> value) into ``model``'s table; returns how many."""
    n = 0
    pending: list[Mapping[str, Any]] = []
    for row in rows:
        pending.append(row)
        if len(pending) >= batch:
            n += _flush(session, model, pending)
    return n + _flush(session, model, pending)


def insert_returning_ids(
    session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]]
) -> list[int]:
    """Insert ``rows`` and return their new integer primary keys, in order."""
    if not rows:
        return []
    pk = model.__mapper__.primary_key[0]
    result = session.execute(insert(model).returning(pk, sort_by_parameter_order=True), list(rows))
    return [int(v) for v in result.scalars()]


def _flush(session: Session, model: type[Base], pending: list[Mapping[str, Any]]) -> int:
    if not pending:
        return 0
    session.execute(insert(model), list(pending))
    n = len(pending)
    pending.clear()
    return n
