"""Rounds and who takes part in them.

The selected set is the ``participations`` table, not a JSON list on the round: a client
dropping out or reporting is then a one-row UPDATE that cannot race another client's
(a JSON list would be read-modify-write of the whole list), the ids are foreign keys,
and "which rounds did this client take part in" is an indexed lookup.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.enums import ParticipationState, RoundState
from db.models.types import json_default, utcnow


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"), Index(None, "run_id", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    number: Mapped[int]
    state: Mapped[RoundState] = mapped_column(default=RoundState.OPEN)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    # Updates counted toward the round (participations that reached state update).
    received: Mapped[int] = mapped_column(default=0)
    quorum: Mapped[int]
    # 1 on the first try; a retry after a failure bumps it.
    attempt: Mapped[int] = mapped_column(default=1)
    # rounds <-> model_versions reference each other; use_alter lets the tables be created
    # first and this constraint added after (Postgres checks the target at CREATE TABLE).
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL", use_alter=True)
    )
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL", use_alter=True)
    )
    # loss, accuracy, duration_s, bytes_up, bytes_down, ...
    metrics: Mapped[dict[str, Any]] = mapped_column(default=json_default)

    def __repr__(self) -> str:
        return (
            f"Round(id={self.id!r}, run_id={self.run_id!r}, number={self.number!r}, "
            f"state={self.state!r})"
        )


class Participation(Base):
    __tablename__ = "participations"
    __table_args__ = (Index(None, "client_id"),)

    round_id: Mapped[int] = mapped_column(
        ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True
    )
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[ParticipationState] = mapped_column(default=ParticipationState.SELECTED)
    num_samples: Mapped[int | None]
    # Nulled when retention deletes the blob; bytes and the metrics stay for the record.
    update_sha: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256", ondelete="SET NULL"))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    train_time_s: Mapped[float | None]
    loss: Mapped[float | None]
    accuracy: Mapped[float | None]
    received_at: Mapped[datetime | None]
    message_id: Mapped[str | None] = mapped_column(String(100))

    def __repr__(self) -> str:
        return (
            f"Participation(round_id={self.round_id!r}, client_id={self.client_id!r}, "
            f"state={self.state!r})"
        )
