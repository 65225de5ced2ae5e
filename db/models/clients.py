"""Clients: devices that joined a run, known only by a de-identified id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.enums import ClientState
from db.models.types import json_default, utcnow


class Client(Base):
    __tablename__ = "clients"
    # (run_id, joined_at, id): the dashboard pages a run's clients in joining order.
    __table_args__ = (Index(None, "run_id", "state"), Index(None, "run_id", "joined_at", "id"))

    # uuid4 hex minted at registration; a device's own name is only ever display_name.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    display_name: Mapped[str] = mapped_column(String(200))
    state: Mapped[ClientState] = mapped_column(default=ClientState.JOIN)
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    device_info: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    # SHA-256 hex of the client's bearer token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    rounds_participated: Mapped[int] = mapped_column(default=0)

    def __repr__(self) -> str:
        return f"Client(id={self.id!r}, run_id={self.run_id!r}, state={self.state!r})"
