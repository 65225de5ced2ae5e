"""A run: one federation with its config, from the first round to the last."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.enums import RunStatus
from db.models.types import JSONType, json_default, utcnow


class Run(Base):
    __tablename__ = "runs"

    # The wire's run id (an AMQP routing-key word, so [A-Za-z0-9_-]{1,64}); the
    # envelope's run_id is used as is. create_run mints a uuid4 hex unless given one.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    status: Mapped[RunStatus] = mapped_column(default=RunStatus.CREATED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # None: no autorun; otherwise how many more rounds autorun will open (paper 2's autorun N).
    autorun_remaining: Mapped[int | None]
    # Number of the latest round opened; 0 before the first.
    current_round: Mapped[int] = mapped_column(default=0)
    # The orchestrator's snapshot of the round state machine: its head (run scalars, policy,
    # current round without its received updates; orchestrator.state.serde.head_to_dict),
    # with the clients and received updates in machine_parts rows. None until the run is
    # made for the orchestrator (orchestrator.runs.create_run).
    machine: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Bumped by every save of the snapshot: an orchestrator process keeps the snapshot it
    # last saved or loaded and reuses it while this still matches (orchestrator.store).
    machine_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, name={self.name!r}, status={self.status!r})"
