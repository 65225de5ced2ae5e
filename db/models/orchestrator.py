"""The orchestrator's durable plumbing: the outbox of side effects, staged upload chunks, the
inbox of stored updates not yet counted, and the parts of the machine snapshot that are saved
one by one."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import BigIntId, json_default, utcnow


class OutboxItem(Base):
    """A side effect decided in a committed transaction and not yet carried out.

    Written in the same transaction as the state change, drained after the commit (and again
    on restart), so a crash between the two repeats the side effect instead of losing it.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index(None, "sent_at", "id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    # A plain value: the outbox may outlive its run (events about a deleted run still go out).
    run_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


class UploadChunk(Base):
    """One received chunk of a client's update, kept until the whole blob is in."""

    __tablename__ = "upload_chunks"
    __table_args__ = (Index(None, "received_at"),)

    blob_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    idx: Mapped[int] = mapped_column(primary_key=True)
    count: Mapped[int]
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int]
    meta: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    # Postgres: STORAGE EXTERNAL (migration 0010): zstd frames gain nothing from pglz.
    data: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class MachinePart(Base):
    """One piece of a run's machine snapshot kept in its own row, so that a step saves only
    what it changed: ``c:<client id>`` a client record, ``u:<index>`` the current round's
    received update at that position. The rest of the snapshot is ``runs.machine``."""

    __tablename__ = "machine_parts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=json_default)


class InboxUpdate(Base):
    """An update stored (its blob committed, its message acknowledged) and not yet counted
    by the run's machine.

    Ingest consumers write these without the run lock, in parallel; the run's counter takes
    them under the lock and steps the machine through them in one batch, deleting the rows
    in the same transaction. So storing an update (the heavy part) never waits for the
    machine, and a crash between the two leaves the row for the next count.
    """

    __tablename__ = "update_inbox"
    # One update per client per round: a second one is a duplicate before it is counted.
    __table_args__ = (UniqueConstraint("run_id", "round", "client_id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round: Mapped[int]
    client_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(100))
    update_sha: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int]
    bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
