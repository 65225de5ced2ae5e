"""The orchestrator's queries: the run lock and snapshot, the outbox, staged upload chunks."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import (
    Client,
    OutboxItem,
    Participation,
    ParticipationState,
    Round,
    RoundState,
    Run,
    UploadChunk,
    utcnow,
)
from db.queries._sql import changed, insert_ignore


def lock_run(session: Session, run_id: str) -> Run | None:
    """The run row, locked for the rest of the transaction (FOR UPDATE on Postgres; SQLite's
    BEGIN IMMEDIATE already serialises writers). Every step of a run's machine holds it, so
    two consumers (threads or processes) never step the same run at once."""
    return session.scalar(
        select(Run)
        .where(Run.id == run_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def save_machine(session: Session, run_id: str, machine: dict[str, Any]) -> None:
    session.execute(
        update(Run).where(Run.id == run_id).values(machine=machine, updated_at=utcnow())
    )


def active_run_ids(session: Session) -> list[str]:
    """Runs the orchestrator steps (those with a snapshot, i.e. created for it)."""
    return list(session.scalars(select(Run.id).where(Run.machine.is_not(None)).order_by(Run.id)))


def runs_awaiting_tasks(session: Session) -> list[str]:
    """Runs whose current round waits for a worker (aggregating or evaluating): a cheap,
    indexed check the orchestrator can afford many times a second."""
    busy = (RoundState.AGGREGATING, RoundState.EVALUATING)
    return list(session.scalars(select(Round.run_id).where(Round.state.in_(busy)).distinct()))


# --- rounds beyond db.queries.rounds: a retry reuses the round's row ------------------------


def sync_round(
    session: Session,
    round_id: int,
    *,
    state: RoundState,
    attempt: int,
    quorum: int,
    deadline: datetime | None,
) -> None:
    values: dict[str, Any] = {"state": state, "attempt": attempt, "quorum": quorum}
    if deadline is not None:
        values["deadline"] = deadline
    if state == RoundState.OPEN:
        values["closed_at"] = None
    else:
        values["closed_at"] = func.coalesce(Round.closed_at, utcnow())
    session.execute(update(Round).where(Round.id == round_id).values(values))


def set_participation_state(
    session: Session,
    round_id: int,
    client_id: str,
    state: ParticipationState,
    *,
    expected: Iterable[ParticipationState],
) -> bool:
    stmt = (
        update(Participation)
        .where(
            Participation.round_id == round_id,
            Participation.client_id == client_id,
            Participation.state.in_(list(expected)),
        )
        .values(state=state)
    )
    return changed(session, stmt) == 1


def client_states(session: Session, run_id: str) -> dict[str, str]:
    rows = session.execute(select(Client.id, Client.state).where(Client.run_id == run_id))
    return {cid: str(state) for cid, state in rows}


# --- outbox ---------------------------------------------------------------------------------


def add_outbox(session: Session, run_id: str | None, kind: str, payload: dict[str, Any]) -> int:
    item = OutboxItem(run_id=run_id, kind=kind, payload=payload, created_at=utcnow())
    session.add(item)
    session.flush()
    return item.id


def pending_outbox(session: Session, limit: int = 200) -> list[OutboxItem]:
    """Unsent items, oldest first."""
    stmt = (
        select(OutboxItem).where(OutboxItem.sent_at.is_(None)).order_by(OutboxItem.id).limit(limit)
    )
    return list(session.scalars(stmt))


def mark_sent(session: Session, item_ids: Iterable[int]) -> None:
    ids = list(item_ids)
    if ids:
        session.execute(update(OutboxItem).where(OutboxItem.id.in_(ids)).values(sent_at=utcnow()))


def outbox_sent(session: Session, run_id: str, kind: str) -> list[OutboxItem]:
    stmt = select(OutboxItem).where(OutboxItem.run_id == run_id, OutboxItem.kind == kind)
    return list(session.scalars(stmt.order_by(OutboxItem.id)))


# --- staged upload chunks -------------------------------------------------------------------


def stage_chunk(session: Session, values: dict[str, Any]) -> bool:
    """Keep one chunk; a re-delivered chunk (same blob id and index) is ignored."""
    return insert_ignore(
        session, UploadChunk, {**values, "received_at": utcnow()}, ("blob_id", "idx")
    )


def staged_count(session: Session, blob_id: str) -> int:
    return int(session.scalar(select(func.count()).where(UploadChunk.blob_id == blob_id)) or 0)


def staged_data(session: Session, blob_id: str) -> list[bytes]:
    stmt = select(UploadChunk.data).where(UploadChunk.blob_id == blob_id)
    return list(session.scalars(stmt.order_by(UploadChunk.idx)))


def delete_staged(session: Session, blob_id: str) -> int:
    return changed(session, delete(UploadChunk).where(UploadChunk.blob_id == blob_id))


def expire_staged(session: Session, older_than: datetime) -> list[str]:
    """Drop blobs whose latest chunk is older than ``older_than``; returns their blob ids."""
    stale = list(
        session.scalars(
            select(UploadChunk.blob_id)
            .group_by(UploadChunk.blob_id)
            .having(func.max(UploadChunk.received_at) < older_than)
        )
    )
    if stale:
        session.execute(delete(UploadChunk).where(UploadChunk.blob_id.in_(stale)))
    return stale
