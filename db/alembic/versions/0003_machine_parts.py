"""The machine snapshot saved in parts: runs.machine_seq and the machine_parts table.

A step used to rewrite the run's whole snapshot (every client and the open round's received
updates) in ``runs.machine``; now each client record and each received update is a row of
``machine_parts`` and a step writes only the rows it changed, and ``runs.machine_seq`` (bumped
by every save) lets an orchestrator process reuse the snapshot it last saw.

Upgrading leaves the existing snapshots whole: the orchestrator reads the old format and
splits it at its next save. Downgrading folds the parts back into ``runs.machine``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 00:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("machine_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.create_table(
        "machine_parts",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_machine_parts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_machine_parts")),
    )
    runs = sa.table("runs", sa.column("machine", JSON), sa.column("machine_seq", sa.BigInteger))
    op.execute(runs.update().where(runs.c.machine.is_not(None)).values(machine_seq=1))


def downgrade() -> None:
    conn = op.get_bind()
    runs = sa.table(
        "runs", sa.column("id", sa.String), sa.column("machine", JSON), sa.column("machine_seq")
    )
    parts = sa.table(
        "machine_parts", sa.column("run_id"), sa.column("key"), sa.column("data", JSON)
    )
    for run_id, head in conn.execute(sa.select(runs.c.id, runs.c.machine)).all():
        if not isinstance(head, dict) or "clients" in head:
            continue  # no snapshot, or one never split
        rows = conn.execute(
            sa.select(parts.c.key, parts.c.data).where(parts.c.run_id == run_id)
        ).all()
        conn.execute(runs.update().where(runs.c.id == run_id).values(machine=_whole(head, rows)))
    op.drop_table("machine_parts")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("machine_seq")


def _whole(head: dict[str, Any], rows: Sequence[Any]) -> dict[str, Any]:
    """The 0002 snapshot: clients sorted by id, the round with its received updates."""
    clients = sorted(
        (data for key, data in rows if key.startswith("c:")), key=lambda c: c["client_id"]
    )
    received = sorted(
        ((int(key[2:]), data) for key, data in rows if key.startswith("u:")), key=lambda r: r[0]
    )
    whole = {k: v for k, v in head.items() if k != "format"}
    whole["clients"] = clients
    if whole.get("round") is not None:
        whole["round"] = {**whole["round"], "received": [data for _, data in received]}
    return whole
