"""The two primitives behind every idempotent write: insert-unless-present and
compare-and-set (an UPDATE whose WHERE states what must still be true), each telling the
caller whether it changed anything. A re-delivered message then neither raises nor writes
twice."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy import (
    Column,
    ColumnElement,
    CursorResult,
    Executable,
    Table,
    TextClause,
    text,
)
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
    return set(bulk_insert(session, model, rows, ignore=conflict_columns, returning=returning.key))


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


# --- Postgres bulk writes: one statement, one parameter ----------------------------------------


def bulk_insert(
    session: Session,
    target: Table | type[Base],
    rows: Sequence[Mapping[str, Any]],
    *,
    ignore: Sequence[str] = (),
    upsert: Sequence[str] = (),
    returning: str | None = None,
) -> list[Any]:
    """Insert ``rows`` (all with the same keys) in one statement; ``ignore``: the unique
    key whose conflicts are skipped (ON CONFLICT DO NOTHING), ``upsert``: the columns a
    conflict on ``ignore`` overwrites instead. Returns the ``returning`` column of the rows
    written (in no particular order), else [].

    On Postgres the rows travel as one JSON array that the server turns back into rows of
    the table's types (``json_populate_recordset``): the statement's text is short and the
    same for any number of rows, and the parameter is one string. SQLAlchemy's multi-row
    VALUES names every value, so each batch was a new statement of thousands of
    placeholders that psycopg parsed again (a seventh of the orchestrator's time under
    load); arrays per column cost as much again in psycopg's escaping of each element.
    Rows JSON cannot carry (bytes, NaN) and other backends take the Core executemany path.
    """
    if not rows:
        return []
    table = cast(Table, target if isinstance(target, Table) else target.__table__)
    dialect = session.get_bind().dialect.name
    keys = tuple(rows[0])
    if dialect == "postgresql":
        spec = _recordset_statement(table, keys, tuple(ignore), tuple(upsert), returning)
        try:
            if spec.defaults:
                defaults = {c.name: _default(c) for c in spec.defaults}
                doc = _dumps([{**defaults, **r} for r in rows])
            else:
                doc = _dumps(rows)
        except (TypeError, ValueError):
            doc = None  # not JSON-able: the general path below
        if doc is not None and all(len(r) == len(keys) for r in rows):
            result = session.execute(spec.stmt, {"rows": doc})
            return list(result.scalars()) if returning else []
    return _insert_rows(session, dialect, table, rows, ignore, upsert, returning)


def _insert_rows(
    session: Session,
    dialect: str,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    ignore: Sequence[str],
    upsert: Sequence[str],
    returning: str | None,
) -> list[Any]:
    stmt: Any = dialect_insert(dialect, table)
    if upsert:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(ignore), set_={c: stmt.excluded[c] for c in upsert}
        )
    elif ignore:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(ignore))
    if returning:
        return list(session.scalars(stmt.returning(table.c[returning]), list(rows)))
    session.execute(stmt, list(rows))
    return []


class _Recordset(NamedTuple):
    stmt: TextClause
    defaults: list[Column[Any]]


_RecordsetKey = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], str | None]
_RECORDSETS: dict[_RecordsetKey, _Recordset] = {}


def _recordset_statement(
    table: Table,
    keys: tuple[str, ...],
    ignore: tuple[str, ...],
    upsert: tuple[str, ...],
    returning: str | None,
) -> _Recordset:
    cache_key = (table.name, keys, ignore, upsert, returning)
    spec = _RECORDSETS.get(cache_key)
    if spec is not None:
        return spec
    # Columns the rows leave out get their Python-side default, as a Core INSERT would.
    defaults = [
        c for c in table.c if c.name not in keys and c.default is not None and not c.primary_key
    ]
    names = ", ".join(f'"{n}"' for n in (*keys, *(c.name for c in defaults)))
    sql = (
        f'INSERT INTO "{table.name}" ({names}) SELECT {names} '
        f'FROM json_populate_recordset(NULL::"{table.name}", CAST(:rows AS json))'
    )
    if ignore:
        conflict = ", ".join(f'"{c}"' for c in ignore)
        if upsert:
            sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in upsert)
            sql += f" ON CONFLICT ({conflict}) DO UPDATE SET {sets}"
        else:
            sql += f" ON CONFLICT ({conflict}) DO NOTHING"
    if returning:
        sql += f' RETURNING "{returning}"'
    stmt = text(sql)
    if returning:
        stmt = stmt.columns(table.c[returning])  # type: ignore[assignment]
    spec = _RECORDSETS[cache_key] = _Recordset(stmt, defaults)
    return spec


def _default(c: Column[Any]) -> Any:
    default = cast(Any, c.default)
    return default.arg(None) if default.is_callable else default.arg


def _dumps(rows: Any) -> str:
    return json.dumps(rows, allow_nan=False, default=_json_value, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    """What the JSON encoder does not know: aware datetimes (as ISO 8601, which
    Postgres reads back exactly) and enums; anything else is not for this path."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} does not travel as JSON")


def bulk_update(
    session: Session,
    target: Table | type[Base],
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
) -> None:
    """Set each row's other columns on the table row its ``keys`` columns name (all rows
    with the same columns), in one statement on Postgres (the rows as one JSON array, as in
    ``bulk_insert``); a Core executemany elsewhere."""
    if not rows:
        return
    table = cast(Table, target if isinstance(target, Table) else target.__table__)
    columns = tuple(rows[0])
    sets = tuple(c for c in columns if c not in keys)
    if session.get_bind().dialect.name == "postgresql" and sets:
        try:
            doc = _dumps(rows)
        except (TypeError, ValueError):
            doc = None
        if doc is not None and all(len(r) == len(columns) for r in rows):
            session.execute(_update_statement(table, tuple(keys), sets), {"rows": doc})
            return
    stmt = (
        sa.update(table)
        .where(*(table.c[k] == sa.bindparam(f"k_{k}") for k in keys))
        .values({c: sa.bindparam(f"v_{c}") for c in sets})
    )
    session.execute(
        stmt, [{**{f"k_{k}": r[k] for k in keys}, **{f"v_{c}": r[c] for c in sets}} for r in rows]
    )


_UPDATES: dict[tuple[str, tuple[str, ...], tuple[str, ...]], TextClause] = {}


def _update_statement(table: Table, keys: tuple[str, ...], sets: tuple[str, ...]) -> TextClause:
    cache_key = (table.name, keys, sets)
    stmt = _UPDATES.get(cache_key)
    if stmt is None:
        assignments = ", ".join(f'"{c}" = v."{c}"' for c in sets)
        match = " AND ".join(f't."{k}" = v."{k}"' for k in keys)
        stmt = _UPDATES[cache_key] = text(
            f'UPDATE "{table.name}" AS t SET {assignments} '
            f'FROM json_populate_recordset(NULL::"{table.name}", CAST(:rows AS json)) AS v '
            f"WHERE {match}"
        )
    return stmt
