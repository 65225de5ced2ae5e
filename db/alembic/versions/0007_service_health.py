"""Service health: one heartbeat row per long-running process (and per child of `fedmq up`),
so that the dashboard can say which service is reconnecting, restarting or gone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-20 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "service_health",
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("since", _tz(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("reconnects", sa.Integer(), nullable=False),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("started_at", _tz(), nullable=False),
        sa.Column("seen_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_health")),
    )
    op.create_index(op.f("ix_service_health_seen_at"), "service_health", ["seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_service_health_seen_at"), table_name="service_health")
    op.drop_table("service_health")
