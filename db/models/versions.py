"""Global model versions: one per aggregated round, plus the initial model (no round).

Numbered from 0 per run (the wire's ``model_version >= 0``): the initial model is 0, so
with one version per round, round N produces version N.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import json_default, utcnow


class ModelVersion(Base):
    __tablename__ = "model_versions"
    # unique round_id: a re-run aggregate task cannot add a second version for a round.
    # NULLs never collide, so any number of round-less (initial, imported) versions fit.
    __table_args__ = (UniqueConstraint("run_id", "version"), UniqueConstraint("round_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    version: Mapped[int]
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"))
    # No ON DELETE: a model blob still in use must never be deleted.
    blob_sha: Mapped[str] = mapped_column(String(64), ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=json_default)

    def __repr__(self) -> str:
        return (
            f"ModelVersion(run_id={self.run_id!r}, version={self.version!r}, "
            f"round_id={self.round_id!r})"
        )
