"""Rounds and participations: the durable half of the round state machine.

Every write is a compare-and-set, so the orchestrator can repeat any step after a crash or
a re-delivered message and nothing changes twice.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import (
    Client,
    Participation,
    ParticipationState,
    Round,
    RoundState,
    Run,
    utcnow,
)
from db.models.enums import PENDING_PARTICIPATION
from db.queries._sql import bulk_update, changed, in_states, insert_ignore, insert_many_ignore


class UpdateOutcome(enum.StrEnum):
    ACCEPTED = "accepted"  # counted toward the round
    DUPLICATE = "duplicate"  # already recorded: a re-delivery; ack it and do nothing
    LATE = "late"  # the round had closed (or the client was dropped): kept, not counted
    NOT_SELECTED = "not_selected"  # not in this round (or no such round): nothing stored


def create_round(
    session: Session,
    run_id: str,
    number: int,
    *,
    quorum: int,
    selected: Iterable[str],
    deadline: datetime | None = None,
    base_version_id: int | None = None,
    attempt: int = 1,
    now: datetime | None = None,
) -> Round:
    """Open round ``number`` of a run with the ``selected`` client ids expected to report.

    Raises IntegrityError if the run already has that round number.
    """
    rnd = Round(
        run_id=run_id,
        number=number,
        quorum=quorum,
        deadline=deadline,
        base_version_id=base_version_id,
        attempt=attempt,
        opened_at=now or utcnow(),
    )
    session.add(rnd)
    session.flush()
    rows = [
        {"round_id": rnd.id, "client_id": cid, "state": ParticipationState.SELECTED}
        for cid in dict.fromkeys(selected)  # de-duplicated, order kept
    ]
    # One multi-row INSERT, not one a client: a round of 10,000 took 10,000 statements.
    insert_many_ignore(
        session, Participation, rows, ("round_id", "client_id"), Participation.client_id
    )
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.current_round < number)
        .values(current_round=number, updated_at=utcnow())
    )
    return rnd


def get_round(session: Session, run_id: str, number: int) -> Round | None:
    return session.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))


def get_open_round(session: Session, run_id: str) -> Round | None:
    """The round accepting updates, if any (at most one per run, by the orchestrator)."""
    return session.scalar(
        select(Round)
        .where(Round.run_id == run_id, Round.state == RoundState.OPEN)
        .order_by(Round.number.desc())
        .limit(1)
    )


def latest_round(session: Session, run_id: str) -> Round | None:
    return session.scalar(
        select(Round).where(Round.run_id == run_id).order_by(Round.number.desc()).limit(1)
    )


def list_rounds(session: Session, run_id: str) -> list[Round]:
    return list(session.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)))


def set_round_state(
    session: Session,
    round_id: int,
    state: RoundState,
    *,
    expected: RoundState | Iterable[RoundState] | None = None,
    now: datetime | None = None,
) -> bool:
    """Move a round to ``state``, only from ``expected`` when given; returns whether it moved.

    Leaving ``open`` stamps closed_at once; going back to ``open`` (a retry) clears it.
    The UPDATE locks the round row, which is what orders it against record_update.
    """
    values: dict[str, Any] = {"state": state}
    if state == RoundState.OPEN:
        values["closed_at"] = None
    else:
        values["closed_at"] = func.coalesce(Round.closed_at, now or utcnow())
    stmt = update(Round).where(Round.id == round_id).values(values)
    if expected is not None:
        stmt = stmt.where(in_states(Round.state, expected))
    return changed(session, stmt) == 1


def set_round_metrics(session: Session, round_id: int, metrics: dict[str, Any]) -> None:
    """Merge ``metrics`` into the round's (loss, accuracy, duration_s, bytes_up, ...)."""
    rnd = session.get_one(Round, round_id, with_for_update=True, populate_existing=True)
    rnd.metrics = {**rnd.metrics, **metrics}


def record_participation(
    session: Session,
    round_id: int,
    client_id: str,
    state: ParticipationState = ParticipationState.SELECTED,
) -> bool:
    """Add a client to a round unless already in it; returns whether it was new."""
    return insert_ignore(
        session,
        Participation,
        {"round_id": round_id, "client_id": client_id, "state": state},
        ("round_id", "client_id"),
    )


def start_training(session: Session, round_id: int, client_id: str) -> bool:
    """selected → training (the client said it started); returns whether it moved."""
    stmt = (
        update(Participation)
        .where(
            Participation.round_id == round_id,
            Participation.client_id == client_id,
            Participation.state == ParticipationState.SELECTED,
        )
        .values(state=ParticipationState.TRAINING)
    )
    return changed(session, stmt) == 1


def drop_participant(session: Session, round_id: int, client_id: str) -> bool:
    """Take a client that left out of the expected set; returns whether it was expected."""
    stmt = (
        update(Participation)
        .where(
            Participation.round_id == round_id,
            Participation.client_id == client_id,
            Participation.state.in_(PENDING_PARTICIPATION),
        )
        .values(state=ParticipationState.DROPPED)
    )
    return changed(session, stmt) == 1


def record_update(
    session: Session,
    round_id: int,
    client_id: str,
    *,
    update_sha: str,
    num_samples: int,
    nbytes: int,
    train_time_s: float | None = None,
    loss: float | None = None,
    accuracy: float | None = None,
    message_id: str | None = None,
    now: datetime | None = None,
) -> UpdateOutcome:
    """Record a client's update (its blob already stored) and count it if the round is open.

    Idempotent: a second call for the same (round, client) returns DUPLICATE and changes
    nothing. The round row is locked first (FOR UPDATE; SQLite's write lock does the same)
    so an update cannot be counted into a round that a concurrent transaction is closing.
    """
    row = {
        "client_id": client_id,
        "update_sha": update_sha,
        "num_samples": num_samples,
        "bytes": nbytes,
        "train_time_s": train_time_s,
        "loss": loss,
        "accuracy": accuracy,
        "received_at": now or utcnow(),
        "message_id": message_id,
    }
    return record_updates(session, round_id, [row])[client_id]


_UPDATE_COLUMNS = (
    "state",
    "update_sha",
    "num_samples",
    "bytes",
    "loss",
    "accuracy",
    "train_time_s",
    "message_id",
    "received_at",
)


def record_updates(
    session: Session, round_id: int, updates: list[dict[str, Any]]
) -> dict[str, UpdateOutcome]:
    """``record_update`` for many clients of one round in a few statements (a group
    commit's updates); each of ``updates`` holds ``client_id`` and the columns
    ``record_update`` writes (update_sha, num_samples, bytes, train_time_s, loss, accuracy,
    received_at, message_id). Same rules: a client already recorded, or not selected, is
    skipped; into a round that is not open an update is recorded late. Returns each
    client's outcome (the first of a client's updates decides it)."""
    round_state = session.scalar(select(Round.state).where(Round.id == round_id).with_for_update())
    outcomes: dict[str, UpdateOutcome] = {}
    if round_state is None or not updates:
        return {u["client_id"]: UpdateOutcome.NOT_SELECTED for u in updates}
    rows_found = session.execute(
        select(Participation.client_id, Participation.state)
        .where(
            Participation.round_id == round_id,
            Participation.client_id.in_({u["client_id"] for u in updates}),
        )
        .with_for_update()
    )
    states = {cid: state for cid, state in rows_found}
    rows: list[dict[str, Any]] = []
    counted: list[str] = []
    for u in updates:
        cid = u["client_id"]
        state = states.get(cid)
        if state is None or state in (ParticipationState.UPDATE, ParticipationState.LATE):
            # Not selected, or recorded already (also earlier in ``updates``).
            outcome = UpdateOutcome.NOT_SELECTED if state is None else UpdateOutcome.DUPLICATE
            outcomes.setdefault(cid, outcome)
            continue
        accepted = round_state == RoundState.OPEN and state in PENDING_PARTICIPATION
        new = ParticipationState.UPDATE if accepted else ParticipationState.LATE
        states[cid] = new
        row = {c: u.get(c) for c in _UPDATE_COLUMNS}
        row.update(round_id=round_id, client_id=cid, state=new)
        rows.append(row)
        outcomes[cid] = UpdateOutcome.ACCEPTED if accepted else UpdateOutcome.LATE
        if accepted:
            counted.append(cid)
    bulk_update(session, Participation, rows, ("round_id", "client_id"))
    if counted:
        session.execute(
            update(Round).where(Round.id == round_id).values(received=Round.received + len(counted))
        )
        session.execute(
            update(Client)
            .where(Client.id.in_(counted))
            .values(rounds_participated=Client.rounds_participated + 1)
        )
    return outcomes


def list_participations(
    session: Session,
    round_id: int,
    state: ParticipationState | Iterable[ParticipationState] | None = None,
) -> list[Participation]:
    stmt = select(Participation).where(Participation.round_id == round_id)
    if state is not None:
        stmt = stmt.where(in_states(Participation.state, state))
    return list(session.scalars(stmt.order_by(Participation.client_id)))


def pending_client_ids(session: Session, round_id: int) -> list[str]:
    """Selected clients the round still waits for; empty means it can close now."""
    return [p.client_id for p in list_participations(session, round_id, PENDING_PARTICIPATION)]


def received_updates(session: Session, round_id: int) -> list[Participation]:
    """The counted updates, for aggregation (sorted by client id: a stable order)."""
    return list_participations(session, round_id, ParticipationState.UPDATE)
