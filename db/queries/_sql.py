"""The two primitives behind every idempotent write: insert-unless-present and
compare-and-set (an UPDATE whose WHERE states what must still be true), each telling the
caller whether it changed anything. A re-delivered message then neither raises nor writes
twice."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Executable, Insert, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def insert_ignore(
    session: Session,
    model: type[Base],
    values: dict[str, Any],
    conflict_columns: Sequence[str],
) -> bool:
    """Insert one row unless it would violate the unique key ``conflict_columns``.

    Returns True when the row was inserted. On Postgres a concurrent insert of the same key
    waits for the other transaction and then does nothing, so exactly one caller gets True.
    Any other constraint violation still raises.
    """
    stmt = (
        dialect_insert(session.get_bind().dialect.name, model)
        .values(values)
        .on_conflict_do_nothing(index_elements=list(conflict_columns))
    )
    # An INSERT's rowcount is only kept when asked for (it reads -1 on psycopg otherwise).
    result = session.execute(stmt.execution_options(preserve_rowcount=True))
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def insert_many_ignore(
    session: Session,
    model: type[Base],
    rows: list[dict[str, Any]],
    conflict_columns: Sequence[str],
    returning: Any,
) -> set[Any]:
    """``insert_ignore`` for many rows in one INSERT; returns the ``returning`` column's
    values of the rows inserted (rows whose key was present, or repeated, are skipped)."""
    if not rows:
        return set()
    name = session.get_bind().dialect.name
    key = (name, model, tuple(conflict_columns), returning.key)
    stmt = _INSERT_IGNORE.get(key)
    if stmt is None:
        stmt = _INSERT_IGNORE[key] = _insert_ignore_stmt(name, model, conflict_columns, returning)
    return set(session.scalars(stmt, rows))


# Rows as parameters, not .values(rows): compiled once, then sent as multi-row INSERTs
# ("insertmanyvalues"). Core statements on the tables, built once per (backend, table) and
# reused: the ORM's bulk-insert path and a statement built anew each call (its cache key
# computed again every time) cost more than running the INSERT.
_INSERT_IGNORE: dict[tuple[str, type[Base], tuple[str, ...], str], Insert] = {}


def _insert_ignore_stmt(
    name: str, model: type[Base], conflict_columns: Sequence[str], returning: Any
) -> Insert:
    table = cast(Table, model.__table__)
    stmt = dialect_insert(name, table)
    return stmt.on_conflict_do_nothing(index_elements=list(conflict_columns)).returning(
        table.c[returning.key]
    )


def dialect_insert(name: str, target: Table | type[Base]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with the ON CONFLICT clauses of backend ``name``."""
    if name == "postgresql":
        return postgresql.insert(target)
    if name == "sqlite":
        return sqlite.insert(target)
    raise NotImplementedError(f"unsupported backend {name!r}")  # pragma: no cover


def changed(session: Session, stmt: Executable) -> int:
    """Execute an UPDATE or DELETE and return how many rows it touched."""
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    return result.rowcount


def in_states(column: Any, states: str | Iterable[str]) -> ColumnElement[bool]:
    """``column = state`` for one state, ``column IN (...)`` for several.

    A str (any StrEnum: ours or protocol's, which share the values) is one state;
    iterating it as a collection would yield its letters.
    """
    if isinstance(states, str):
        return column == states  # type: ignore[no-any-return]
    return column.in_(list(states))  # type: ignore[no-any-return]
