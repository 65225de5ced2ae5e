"""Runs."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Run, RunStatus, utcnow
from db.queries._sql import changed


def create_run(
    session: Session,
    name: str,
    config: dict[str, Any] | None = None,
    *,
    run_id: str | None = None,
    autorun_remaining: int | None = None,
) -> Run:
    """A new run; ``run_id`` is its wire id (a uuid4 hex is minted when not given)."""
    run = Run(
        id=run_id or uuid.uuid4().hex,
        name=name,
        config=config or {},
        autorun_remaining=autorun_remaining,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def get_run_by_name(session: Session, name: str) -> Run | None:
    return session.scalar(select(Run).where(Run.name == name))


def list_runs(session: Session) -> list[Run]:
    return list(session.scalars(select(Run).order_by(Run.created_at, Run.id)))


def set_run_status(
    session: Session, run_id: str, status: RunStatus, *, expected: RunStatus | None = None
) -> bool:
    """Move a run to ``status``; with ``expected``, only from that status (compare-and-set).

    Returns whether the run changed, so a repeated command is a no-op the caller can see.
    """
    stmt = update(Run).where(Run.id == run_id).values(status=status, updated_at=utcnow())
    if expected is not None:
        stmt = stmt.where(Run.status == expected)
    return changed(session, stmt) == 1


def set_autorun(session: Session, run_id: str, remaining: int | None) -> None:
    """Start (N rounds), change, or stop (None) autorun."""
    session.execute(
        update(Run).where(Run.id == run_id).values(autorun_remaining=remaining, updated_at=utcnow())
    )
