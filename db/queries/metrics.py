"""What the metrics endpoint reads at each scrape: a few grouped counts, whatever the
fleet's size (each one ``GROUP BY`` over an indexed column or a count of a small table)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Client, InboxUpdate, OutboxItem, Round, Run


@dataclass(frozen=True)
class StateCounts:
    runs: dict[str, int]  # by status
    rounds: dict[str, int]  # by state
    devices: dict[str, int]  # registered clients by state
    outbox_pending: int
    inbox_pending: int


def _grouped(s: Session, column: object) -> dict[str, int]:
    rows = s.execute(select(column, func.count()).group_by(column))  # type: ignore[call-overload]
    return {str(getattr(k, "value", k)): int(n) for k, n in rows}


def state_counts(s: Session) -> StateCounts:
    pending = select(func.count()).select_from(OutboxItem).where(OutboxItem.sent_at.is_(None))
    return StateCounts(
        runs=_grouped(s, Run.status),
        rounds=_grouped(s, Round.state),
        devices=_grouped(s, Client.state),
        outbox_pending=int(s.scalar(pending) or 0),
        inbox_pending=int(s.scalar(select(func.count()).select_from(InboxUpdate)) or 0),
    )
