"""Service heartbeats (``service_health``): each process upserts its own row; the dashboard
lists them; rows of services gone for long are forgotten."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, case, delete, literal, select
from sqlalchemy.orm import Session

from db.models import ServiceHealth, utcnow
from db.queries._sql import changed, dialect_insert


@dataclass(frozen=True)
class HealthRow:
    """What a service says about itself (``db.models.ServiceHealth``'s columns)."""

    name: str
    kind: str
    host: str
    pid: int
    state: str
    since: datetime | None = None
    attempts: int = 0
    failures: int = 0
    reconnects: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


def record_health(session: Session, row: HealthRow, now: datetime | None = None) -> None:
    """Upsert ``row`` as seen ``now``; ``started_at`` is kept from the first write of this
    name by this pid (a restarted process starts it again)."""
    now = now or utcnow()
    table = cast(Table, ServiceHealth.__table__)
    values: dict[str, Any] = {
        "kind": row.kind,
        "host": row.host,
        "pid": row.pid,
        "state": row.state,
        "since": row.since,
        "attempts": row.attempts,
        "failures": row.failures,
        "reconnects": row.reconnects,
        "detail": row.detail,
        "seen_at": now,
    }
    ins = dialect_insert(session.get_bind().dialect.name, table).values(
        name=row.name, started_at=now, **values
    )
    set_ = {k: ins.excluded[k] for k in values}
    # Same pid: the same process writing again keeps its start; another one starts anew.
    set_["started_at"] = _case_same_pid(table, ins, now)
    session.execute(ins.on_conflict_do_update(index_elements=["name"], set_=set_))


def _case_same_pid(table: Table, ins: Any, now: datetime) -> Any:
    return case((table.c.pid == ins.excluded.pid, table.c.started_at), else_=literal(now))


def list_health(session: Session) -> list[ServiceHealth]:
    return list(session.scalars(select(ServiceHealth).order_by(ServiceHealth.name)))


def forget_health(session: Session, before: datetime) -> int:
    """Drop rows not written since ``before`` (services long gone)."""
    return changed(session, delete(ServiceHealth).where(ServiceHealth.seen_at < before))


def remove_health(session: Session, name: str) -> None:
    session.execute(delete(ServiceHealth).where(ServiceHealth.name == name))
