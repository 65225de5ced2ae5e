"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

# JSONB on Postgres so the dashboard can index into metrics later; plain JSON (TEXT) on SQLite.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

# 64-bit ids on Postgres; SQLite only autoincrements a column declared exactly INTEGER.
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware datetime, stored as UTC, read back aware on every backend.

    SQLite has no time zones: without this, values written aware come back naive and
    comparisons with ``utcnow()`` raise. Naive input is refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def enum_type(length: int = 16) -> sa.Enum:
    """States stored as their string values in VARCHAR + a named CHECK constraint.

    Not a native Postgres ENUM: adding a state then needs only a CHECK change, which both
    backends can do in a migration (ALTER TYPE ... ADD VALUE cannot run in a transaction).
    """
    return sa.Enum(
        enum.Enum,
        native_enum=False,
        create_constraint=True,
        length=length,
        validate_strings=True,
        values_callable=lambda cls: [m.value for m in cls],
    )


def json_default() -> dict[str, Any]:
    return {}
