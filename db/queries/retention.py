"""Pruning of what only grows (issue 17, finding 6): sent outbox rows, old events, old
de-duplication ids.

Every function deletes at most ``limit`` rows in one statement (the oldest first) and
returns how many it deleted; the caller commits each batch on its own, so no prune holds
locks for long or blocks the writers of new rows, and calls again while a batch came back
full. Each batch is found through an index: ``outbox (sent_at, id)``, ``events (ts)``
(migration 0007), ``events (run_id, id)``, ``processed_messages (ts)``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from db.models import Event, OutboxItem, ProcessedMessage
from db.queries._sql import changed


def prune_sent_outbox(session: Session, sent_before: datetime, limit: int) -> int:
    """Outbox rows sent before ``sent_before`` (never an unsent one)."""
    batch = (
        select(OutboxItem.id)
        .where(OutboxItem.sent_at < sent_before)
        .order_by(OutboxItem.sent_at, OutboxItem.id)
        .limit(limit)
    )
    return changed(session, delete(OutboxItem).where(OutboxItem.id.in_(batch.scalar_subquery())))


def prune_old_events(session: Session, before: datetime, limit: int) -> int:
    """Events of any run (or none) recorded before ``before``."""
    batch = select(Event.id).where(Event.ts < before).order_by(Event.ts).limit(limit)
    return changed(session, delete(Event).where(Event.id.in_(batch.scalar_subquery())))


def _of_run(run_id: str | None) -> ColumnElement[bool]:
    return Event.run_id.is_(None) if run_id is None else Event.run_id == run_id


def events_over(session: Session, run_id: str | None, keep: int) -> int | None:
    """The id of the newest event of ``run_id`` (None: the events of no run) beyond its
    newest ``keep``; None when it has no more than ``keep``. Everything up to it goes."""
    stmt = select(Event.id).where(_of_run(run_id)).order_by(Event.id.desc()).offset(keep).limit(1)
    return session.scalar(stmt)


def prune_events_upto(session: Session, run_id: str | None, upto_id: int, limit: int) -> int:
    """Events of ``run_id`` (None: of no run) with ids up to ``upto_id``, oldest first."""
    batch = (
        select(Event.id).where(_of_run(run_id), Event.id <= upto_id).order_by(Event.id).limit(limit)
    )
    return changed(session, delete(Event).where(Event.id.in_(batch.scalar_subquery())))


def prune_processed_before(session: Session, before: datetime, limit: int) -> int:
    """De-duplication ids claimed before ``before``: older than any re-delivery."""
    batch = (
        select(ProcessedMessage.message_id)
        .where(ProcessedMessage.ts < before)
        .order_by(ProcessedMessage.ts)
        .limit(limit)
    )
    return changed(
        session,
        delete(ProcessedMessage).where(ProcessedMessage.message_id.in_(batch.scalar_subquery())),
    )
