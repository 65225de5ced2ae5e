"""The append-only event log (the dashboard's feed) and bus message de-duplication."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import Event, ProcessedMessage, utcnow
from db.queries._sql import changed, insert_ignore, insert_many_ignore


def record_event(
    session: Session,
    kind: str,
    *,
    run_id: str | None = None,
    client_id: str | None = None,
    round: int | None = None,
    message_id: str | None = None,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Event:
    """Append one event; ``round`` is the round number. Its id is set on return."""
    event = Event(
        kind=kind,
        run_id=run_id,
        client_id=client_id,
        round=round,
        message_id=message_id,
        detail=detail or {},
        ts=now or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    run_id: str | None = None,
    *,
    before_id: int | None = None,
    limit: int = 50,
    kinds: Iterable[str] | None = None,
) -> list[Event]:
    """One page of the feed, newest first. Pass the last id of a page as ``before_id`` to
    get the next (keyset paging: stable while events keep arriving, unlike OFFSET).
    ``run_id=None`` means every run."""
    stmt = select(Event)
    if run_id is not None:
        stmt = stmt.where(Event.run_id == run_id)
    if before_id is not None:
        stmt = stmt.where(Event.id < before_id)
    if kinds is not None:
        stmt = stmt.where(Event.kind.in_(list(kinds)))
    return list(session.scalars(stmt.order_by(Event.id.desc()).limit(limit)))


def events_since(
    session: Session, after_id: int, run_id: str | None = None, *, limit: int = 500
) -> list[Event]:
    """Events newer than ``after_id``, oldest first: for tailing the log without gaps."""
    stmt = select(Event).where(Event.id > after_id)
    if run_id is not None:
        stmt = stmt.where(Event.run_id == run_id)
    return list(session.scalars(stmt.order_by(Event.id).limit(limit)))


def mark_messages_processed(
    session: Session, message_ids: Iterable[str], *, now: datetime | None = None
) -> set[str]:
    """``mark_message_processed`` for many messages in one INSERT; returns the ids claimed
    now (the others were processed before, or appear twice in ``message_ids``)."""
    ids = list(dict.fromkeys(message_ids))
    if not ids:
        return set()
    ts = now or utcnow()
    rows = [{"message_id": m, "ts": ts} for m in ids]
    return insert_many_ignore(
        session, ProcessedMessage, rows, ("message_id",), ProcessedMessage.message_id
    )


def unmark_messages_processed(session: Session, message_ids: Iterable[str]) -> None:
    """Release claims taken in this transaction whose messages were refused after all."""
    ids = list(message_ids)
    if ids:
        session.execute(delete(ProcessedMessage).where(ProcessedMessage.message_id.in_(ids)))


def mark_message_processed(
    session: Session, message_id: str, *, now: datetime | None = None
) -> bool:
    """Claim a bus message; False if it was already processed (a re-delivery: skip it).

    Call it in the same transaction as the message's effects, so that a rollback also
    releases the claim and the re-delivered message is processed then.
    """
    return insert_ignore(
        session,
        ProcessedMessage,
        {"message_id": message_id, "ts": now or utcnow()},
        ("message_id",),
    )


def is_message_processed(session: Session, message_id: str) -> bool:
    return session.get(ProcessedMessage, message_id) is not None


def prune_processed_messages(session: Session, older_than: datetime) -> int:
    """Forget ids older than any possible re-delivery; returns how many were deleted."""
    return changed(session, delete(ProcessedMessage).where(ProcessedMessage.ts < older_than))
