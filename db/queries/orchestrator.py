"""The orchestrator's queries: the run lock and snapshot, the outbox, staged upload chunks,
the inbox of stored updates waiting to be counted."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Row, Table, bindparam, delete, event, func, select, text, tuple_, update
from sqlalchemy.orm import Session, defer

from db.models import (
    Client,
    Event,
    InboxUpdate,
    MachinePart,
    OutboxItem,
    Participation,
    ParticipationState,
    Round,
    RoundState,
    Run,
    UploadChunk,
    utcnow,
)
from db.queries._sql import bulk_insert, bulk_update, changed, insert_ignore, insert_many_ignore
from db.queries.leases import INBOX_CHANNEL, notify


def lock_run(session: Session, run_id: str) -> Run | None:
    """The run row, locked for the rest of the transaction (FOR NO KEY UPDATE on Postgres;
    SQLite's BEGIN IMMEDIATE already serialises writers). Every step of a run's machine
    holds it, so two consumers (threads or processes) never step the same run at once.

    Not FOR UPDATE: that also blocks the KEY SHARE lock every insert of a row referencing
    the run takes (an ``update_inbox`` row stored by ingest, a lease claimed by a replica),
    which would make those wait for the machine's steps they are meant to run beside."""
    return session.scalar(
        select(Run)
        .options(defer(Run.machine))  # the snapshot is read by read_machine, when needed
        .where(Run.id == run_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )


def lock_machine_seq(session: Session, run_id: str) -> int | None:
    """``lock_run`` reading only the snapshot's sequence number; None: no such run."""
    return session.scalar(
        select(Run.machine_seq).where(Run.id == run_id).with_for_update(key_share=True)
    )


def machine_seq(session: Session, run_id: str) -> int | None:
    """The snapshot's sequence number, unlocked; None: no such run."""
    return session.scalar(select(Run.machine_seq).where(Run.id == run_id))


def read_machine(
    session: Session, run_id: str
) -> tuple[int, dict[str, Any] | None, list[tuple[str, dict[str, Any]]]] | None:
    """The snapshot as stored: its sequence number, head (``runs.machine``) and parts; None:
    no such run. Without the run lock, compare ``machine_seq`` after it: a save committed
    between the two reads shows there."""
    row = session.execute(select(Run.machine_seq, Run.machine).where(Run.id == run_id)).first()
    if row is None:
        return None
    seq, head = row
    if head is None:
        return seq, None, []
    stmt = select(MachinePart.key, MachinePart.data).where(MachinePart.run_id == run_id)
    return seq, head, [(k, d) for k, d in session.execute(stmt)]


# runs.machine_seq: a new snapshot starts at a random number and every save adds a random
# step. It only ever grows while the run lives, and a process's cached (run, seq) pair cannot
# match a different snapshot by chance: not a run deleted and made again under the same id,
# not a database restored from a backup that went on from the same number.
_SEQ_START = 1 << 62
_SEQ_STEP = 1 << 20


def next_machine_seq(seq: int) -> int:
    return seq + 1 + secrets.randbelow(_SEQ_STEP)


def save_machine(session: Session, run_id: str, machine: dict[str, Any]) -> int:
    """Write a new snapshot, whole (``orchestrator.state.to_dict``), for a new run: it
    replaces any head and parts the run had. Returns its ``machine_seq``."""
    seq = 1 + secrets.randbelow(_SEQ_START)
    session.execute(delete(MachinePart).where(MachinePart.run_id == run_id))
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(machine=machine, machine_seq=seq, updated_at=utcnow())
    )
    return seq


# Keys per DELETE of parts: well under Postgres's 65,535 bind parameters.
_PARTS_PER_STATEMENT = 5000


def save_machine_parts(
    session: Session,
    run_id: str,
    seq: int,
    head: dict[str, Any] | None,
    upserts: dict[str, dict[str, Any]],
    deletes: list[str],
) -> int:
    """Save a step's changes under the run lock read as ``seq``; ``head`` None keeps the
    head. Returns the snapshot's new ``machine_seq``."""
    new_seq = next_machine_seq(seq)
    values: dict[str, Any] = {"machine_seq": new_seq, "updated_at": utcnow()}
    if head is not None:
        values["machine"] = head
    session.execute(update(Run).where(Run.id == run_id).values(values))
    for i in range(0, len(deletes), _PARTS_PER_STATEMENT):
        keys = deletes[i : i + _PARTS_PER_STATEMENT]
        session.execute(
            delete(MachinePart).where(MachinePart.run_id == run_id, MachinePart.key.in_(keys))
        )
    rows = [{"run_id": run_id, "key": k, "data": d} for k, d in upserts.items()]
    bulk_insert(session, MachinePart, rows, ignore=("run_id", "key"), upsert=("data",))
    return new_seq


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


def project_clients(session: Session, rows: list[dict[str, Any]]) -> None:
    """Client rows' state and/or last seen as the machine has them: each row is ``{"id",
    "state"?, "last_seen"?}``; one executemany UPDATE per set of columns."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    for group in by_columns.values():
        bulk_update(session, Client, group, ("id",))


# --- outbox ---------------------------------------------------------------------------------


# Session.info key: outbox rows this transaction queued, written in one INSERT at its commit.
_OUTBOX = "fedmq.outbox"


def add_outbox(session: Session, run_id: str | None, kind: str, payload: dict[str, Any]) -> None:
    """Queue an outbox item. Items are written at the commit, all of them in one INSERT in
    the order they were queued (a batch's notices and events are one statement, not one
    each); a rollback drops them with the rest."""
    _queue(session, [{"run_id": run_id, "kind": kind, "payload": payload}])


def _queue(session: Session, rows: list[dict[str, Any]]) -> None:
    session.info.setdefault(_OUTBOX, []).extend(rows)


@event.listens_for(Session, "before_commit")
def _write_outbox(session: Session) -> None:
    rows = session.info.pop(_OUTBOX, None)
    if rows:
        now = utcnow()
        bulk_insert(session, OutboxItem, [{**r, "created_at": now} for r in rows])


@event.listens_for(Session, "after_soft_rollback")
def _drop_outbox(session: Session, _tx: Any) -> None:
    if not session.in_transaction():
        session.info.pop(_OUTBOX, None)


def record_effects(
    session: Session,
    run_id: str,
    events: list[dict[str, Any]],
    payloads: list[dict[str, Any]],
) -> None:
    """A step's effects: ``events`` rows (kind, client_id, round, message_id, detail) for
    the event log, in one INSERT, and ``payloads`` queued as outbox items of kind "event"
    (``add_outbox``)."""
    if events:
        now = utcnow()
        bulk_insert(session, Event, [{**e, "run_id": run_id, "ts": now} for e in events])
    _queue(session, [{"run_id": run_id, "kind": "event", "payload": p} for p in payloads])


# Key of the advisory lock one outbox drainer at a time holds (ASCII "fedo", 0).
_OUTBOX_LOCK = (0x6665646F, 0)


def lock_outbox(session: Session) -> None:
    """Postgres: wait until no other drainer (of any process) holds the outbox, then hold
    it until this transaction ends; or two replicas read the same pending rows and send
    each twice. SQLite is one process, whose drainers a thread lock already orders."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:k1, :k2)"),
            {"k1": _OUTBOX_LOCK[0], "k2": _OUTBOX_LOCK[1]},
        )


_outbox = cast(Table, OutboxItem.__table__)
# Core statements on the table, built once: the ORM's bulk UPDATE re-evaluated its WHERE
# against the session per call (a seventh of a drain).
_PENDING = (
    select(_outbox.c.id, _outbox.c.run_id, _outbox.c.kind, _outbox.c.payload)
    .where(_outbox.c.sent_at.is_(None))
    .order_by(_outbox.c.id)
    .limit(bindparam("limit"))
)
_MARK_SENT = (
    update(_outbox)
    .where(_outbox.c.id.in_(bindparam("ids", expanding=True)))
    .values(sent_at=bindparam("now"))
)
# Postgres: the ids as one array, so the statement's text does not grow with the page.
_MARK_SENT_PG = text("UPDATE outbox SET sent_at = :now WHERE id = ANY(CAST(:ids AS bigint[]))")


def pending_outbox(
    session: Session, limit: int = 200
) -> Sequence[Row[tuple[int, str | None, str, dict[str, Any]]]]:
    """Unsent items (id, run_id, kind, payload), oldest first. Rows, not entities: the
    drainer only reads them, and loading each as an ORM instance cost a sixth of a drain."""
    return session.execute(_PENDING, {"limit": limit}).all()  # type: ignore[return-value]


def mark_sent(session: Session, item_ids: Iterable[int]) -> None:
    ids = list(item_ids)
    if ids:
        pg = session.get_bind().dialect.name == "postgresql"
        session.execute(_MARK_SENT_PG if pg else _MARK_SENT, {"ids": ids, "now": utcnow()})


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


# --- what ingest checks an update against ------------------------------------------------
# Plain rows, not entities: ingest only reads them, and loading each as an ORM instance was
# a sixth of an update's store (benchmarks/update_cpu.py).


class Sender(NamedTuple):
    """The client an update names: its run and the hash of its token (its MAC key)."""

    run_id: str
    token_hash: str


class RoundRow(NamedTuple):
    id: int
    state: RoundState


class PartRow(NamedTuple):
    """A client's participation in a round: its state and the update it counted, if any."""

    state: ParticipationState
    message_id: str | None


_client = cast(Table, Client.__table__)
_round = cast(Table, Round.__table__)
_part = cast(Table, Participation.__table__)
_SENDERS = select(_client.c.id, _client.c.run_id, _client.c.token_hash).where(
    _client.c.id.in_(bindparam("ids", expanding=True))
)
_ROUNDS = select(_round.c.run_id, _round.c.number, _round.c.id, _round.c.state).where(
    tuple_(_round.c.run_id, _round.c.number).in_(bindparam("keys", expanding=True))
)
_PARTS = select(_part.c.round_id, _part.c.client_id, _part.c.state, _part.c.message_id).where(
    _part.c.round_id.in_(bindparam("rounds", expanding=True)),
    _part.c.client_id.in_(bindparam("clients", expanding=True)),
)


def senders(session: Session, client_ids: Iterable[str]) -> dict[str, Sender]:
    """The clients of ``client_ids`` that exist, by id (one query)."""
    ids = list(set(client_ids))
    if not ids:
        return {}
    rows = session.execute(_SENDERS, {"ids": ids})
    return {cid: Sender(run_id, token_hash) for cid, run_id, token_hash in rows}


def rounds_by_number(
    session: Session, keys: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], RoundRow]:
    """The rounds of (run id, number) ``keys`` that exist (one query)."""
    wanted = list(set(keys))
    if not wanted:
        return {}
    rows = session.execute(_ROUNDS, {"keys": wanted})
    return {
        (run_id, number): RoundRow(rid, RoundState(state)) for run_id, number, rid, state in rows
    }


def participation_rows(
    session: Session, keys: Iterable[tuple[int, str]]
) -> dict[tuple[int, str], PartRow]:
    """The participations of (round id, client id) ``keys`` that exist (one query)."""
    wanted = set(keys)
    if not wanted:
        return {}
    params = {"rounds": list({r for r, _ in wanted}), "clients": list({c for _, c in wanted})}
    found = {
        (rid, cid): PartRow(ParticipationState(state), mid)
        for rid, cid, state, mid in session.execute(_PARTS, params)
    }
    return {k: p for k, p in found.items() if k in wanted}


# --- the update inbox ---------------------------------------------------------------------


def put_inbox(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Queue stored updates for counting (one INSERT); each row holds run_id, round,
    client_id, message_id, update_sha, num_samples, bytes, metrics. Returns the message ids
    queued: a row whose (run, round, client) already waits is skipped (a second update from
    that client for the round is a duplicate before it is even counted).

    On Postgres the commit also notifies ``INBOX_CHANNEL`` with each run that got a row, so
    that the run's lease holder, in whatever process, counts it at once."""
    now = utcnow()
    queued = cast(
        set[str],
        insert_many_ignore(
            session,
            InboxUpdate,
            [{**r, "received_at": now} for r in rows],
            ("run_id", "round", "client_id"),
            InboxUpdate.message_id,
        ),
    )
    notify(session, INBOX_CHANNEL, (r["run_id"] for r in rows if r["message_id"] in queued))
    return queued


class Waiting(NamedTuple):
    """A stored update waiting to be counted (a row of ``update_inbox``)."""

    id: int
    round: int
    client_id: str
    message_id: str
    update_sha: str
    num_samples: int
    bytes: int
    metrics: dict[str, Any]


_inbox = cast(Table, InboxUpdate.__table__)
_TAKE = (
    select(*(_inbox.c[f] for f in Waiting._fields))
    .where(_inbox.c.run_id == bindparam("run_id"))
    .order_by(_inbox.c.id)
    .limit(bindparam("limit"))
)
_DROP = delete(_inbox).where(_inbox.c.id.in_(bindparam("ids", expanding=True)))


def take_inbox(session: Session, run_id: str, limit: int) -> list[Waiting]:
    """The run's oldest waiting updates (up to ``limit``), deleted in this transaction: the
    caller holds the run lock and counts them before it commits, so a rollback puts them
    back and a commit counts each exactly once. Rows, not entities (a fifth of a count's
    time went to loading them as ORM instances)."""
    rows = [Waiting(*r) for r in session.execute(_TAKE, {"run_id": run_id, "limit": limit})]
    if rows:
        session.execute(_DROP, {"ids": [r.id for r in rows]})
    return rows


def inbox_run_ids(session: Session) -> list[str]:
    """Runs with updates waiting to be counted."""
    return list(session.scalars(select(InboxUpdate.run_id).distinct().order_by(InboxUpdate.run_id)))
