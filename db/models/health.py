"""What each long-running process says about itself: one heartbeat row per service.

Written by the process (orchestrator replicas, workers, gateways) every few seconds, and by
``fedmq up`` for each child it supervises (so that a child that is dead, restarting or
given up on still shows: a dead process writes nothing). The dashboard reads it; a row whose
``seen_at`` is old means its writer is gone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import json_default, utcnow


class ServiceHealth(Base):
    """``state``: the worst of the service's connections (``connected``, ``reconnecting``,
    ``connecting``, ``failed``, ``stopped``) or, for a supervised child, ``running``,
    ``restarting``, ``crash-loop``, ``exited``. ``since``: when it entered that state;
    ``attempts``: failed attempts in a row of the current outage; ``failures`` and
    ``reconnects``: counters that only grow while the process lives (restarts for a child).
    ``detail``: the links one by one, the last error, what the writer adds."""

    __tablename__ = "service_health"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    failures: Mapped[int] = mapped_column(default=0)
    reconnects: Mapped[int] = mapped_column(default=0)
    detail: Mapped[dict[str, Any]] = mapped_column(default=json_default)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
