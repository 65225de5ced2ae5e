"""Event retention: an index on events.ts, so that pruning the oldest events (by the
retention setting, in batches) finds them without scanning the table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain CREATE INDEX locks out writes to events while it builds (seconds at 50k rows,
    # the size found after ~2,000 rounds); CONCURRENTLY cannot run in Alembic's transaction.
    op.create_index(op.f("ix_events_ts"), "events", ["ts"])


def downgrade() -> None:
    op.drop_index(op.f("ix_events_ts"), table_name="events")
