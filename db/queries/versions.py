"""Global model versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.models import ModelVersion, Round, utcnow
from db.queries._sql import insert_ignore


def create_model_version(
    session: Session,
    run_id: str,
    blob_sha: str,
    *,
    round_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> tuple[ModelVersion, bool]:
    """Store the next version of a run's global model; returns (version, created).

    With ``round_id`` it is idempotent per round: a re-run aggregate task gets the version
    already stored (created=False) and the round keeps pointing at it. The round's
    ``model_version_id`` is set here, in the same transaction. Versions count from 0 per
    run (max + 1): two rounds of one run aggregating at once would collide on
    (run_id, version) and one would raise IntegrityError; rounds of a run are sequential.
    """
    values: dict[str, Any] = {
        "run_id": run_id,
        "version": _next_version(run_id),
        "round_id": round_id,
        "blob_sha": blob_sha,
        "metrics": metrics or {},
        "created_at": now or utcnow(),
    }
    if round_id is None:
        mv = session.scalars(insert(ModelVersion).values(values).returning(ModelVersion)).one()
        return mv, True
    created = insert_ignore(session, ModelVersion, values, ("round_id",))
    mv = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.round_id == round_id)
        .execution_options(populate_existing=True)
    ).one()
    if created:
        session.execute(update(Round).where(Round.id == round_id).values(model_version_id=mv.id))
    return mv, created


def _next_version(run_id: str) -> Any:
    return (
        select(func.coalesce(func.max(ModelVersion.version), -1) + 1)
        .where(ModelVersion.run_id == run_id)
        .scalar_subquery()
    )


def get_model_version(session: Session, run_id: str, version: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.version == version)
    )


def get_model_version_by_id(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def latest_model_version(session: Session, run_id: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.run_id == run_id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def list_model_versions(session: Session, run_id: str) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.run_id == run_id).order_by(ModelVersion.version)
        )
    )
