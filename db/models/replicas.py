"""Orchestrator replicas and the runs they lease: several ``fedmq orchestrator`` processes on
one database share the runs' machine work (ticks, task following, counting updates), each run
on one replica at a time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import json_default, utcnow


class Replica(Base):
    """A running orchestrator process, as last heard of. ``seen_at`` is refreshed with its
    leases (every ``lease_renew_s``); one not seen for a lease's time is no longer counted
    in the fair share, and its row is forgotten a while later. ``info`` is for people and
    benchmarks: host, pid, runs held, snapshot-cache hits and misses."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    info: Mapped[dict[str, Any]] = mapped_column(default=json_default)


class RunLease(Base):
    """Which replica does a run's machine work, until when. Only an efficiency: every step
    still takes the run's row lock, so two replicas that both believe they hold a run (one
    paused past its lease) are slower, not wrong. A run with no row, or an expired one, is
    anyone's to claim."""

    __tablename__ = "run_leases"
    __table_args__ = (Index(None, "replica_id"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    # When this replica took it (a renewal keeps it): how long hand-overs take, for tests.
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
