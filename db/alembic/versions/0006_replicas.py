"""Orchestrator replicas and run leases: several orchestrator processes on one database share
the runs' machine work, each run leased to one of them at a time.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("started_at", _tz(), nullable=False),
        sa.Column("seen_at", _tz(), nullable=False),
        sa.Column("info", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    op.create_index(op.f("ix_replicas_seen_at"), "replicas", ["seen_at"])
    op.create_table(
        "run_leases",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("replica_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", _tz(), nullable=False),
        sa.Column("acquired_at", _tz(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_leases_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_leases")),
    )
    op.create_index(op.f("ix_run_leases_replica_id"), "run_leases", ["replica_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_run_leases_replica_id"), table_name="run_leases")
    op.drop_table("run_leases")
    op.drop_index(op.f("ix_replicas_seen_at"), table_name="replicas")
    op.drop_table("replicas")
