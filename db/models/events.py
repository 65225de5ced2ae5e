"""The append-only event log behind the dashboard's feed, and bus de-duplication."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import BigIntId, json_default, utcnow


class Event(Base):
    __tablename__ = "events"
    # The feed pages newest-first by id within a run; a B-tree scans (run_id, id) backwards
    # as well as forwards, so no DESC index is needed (and SQLite reflects DESC poorly).
    # (ts): retention deletes the oldest events in batches (db/queries/retention.py).
    __table_args__ = (Index(None, "run_id", "id"), Index(None, "kind", "id"), Index(None, "ts"))

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    # Plain values, not foreign keys: the log must outlive what it mentions and may
    # mention things that never existed (a rejected registration, an unknown round).
    client_id: Mapped[str | None] = mapped_column(String(64))
    round: Mapped[int | None]
    message_id: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(default=json_default)

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, run_id={self.run_id!r}, kind={self.kind!r})"


class ProcessedMessage(Base):
    """Ids of bus messages already acted on, so a re-delivered one changes nothing twice."""

    __tablename__ = "processed_messages"
    __table_args__ = (Index(None, "ts"),)

    message_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
