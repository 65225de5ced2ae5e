"""Initial schema: runs, clients, rounds, participations, model versions, blobs, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Migrations are frozen history: plain sqlalchemy types here, never db.models, so that a
later change to a model cannot rewrite what an old migration does.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _check(column: str, values: Sequence[str], name: str) -> sa.CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(name))


RUN_STATUS = ("created", "running", "paused", "finished", "failed")
CLIENT_STATE = ("join", "ready", "training", "update", "finish", "offline")
ROUND_STATE = ("open", "aggregating", "evaluating", "done", "failed")
PARTICIPATION_STATE = ("selected", "training", "update", "dropped", "late")
BLOB_KIND = ("model", "update", "other")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.Column("autorun_remaining", sa.Integer(), nullable=True),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_runs_name")),
        _check("status", RUN_STATUS, "ck_runs_runstatus"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
        _check("kind", BLOB_KIND, "ck_blobs_blobkind"),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"], ["blobs.sha256"], name=op.f("fk_blob_chunks_sha256_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sha256", "idx", name=op.f("pk_blob_chunks")),
    )
    op.create_table(
        "processed_messages",
        sa.Column("message_id", sa.String(length=100), nullable=False),
        sa.Column("ts", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_processed_messages")),
    )
    op.create_index(op.f("ix_processed_messages_ts"), "processed_messages", ["ts"])
    op.create_table(
        "clients",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("joined_at", _tz(), nullable=False),
        sa.Column("last_seen", _tz(), nullable=False),
        sa.Column("device_info", JSON, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("rounds_participated", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_clients_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_clients_token_hash")),
        _check("state", CLIENT_STATE, "ck_clients_clientstate"),
    )
    op.create_index(op.f("ix_clients_run_id_state"), "clients", ["run_id", "state"])
    op.create_table(
        "events",
        sa.Column("id", BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("ts", _tz(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("message_id", sa.String(length=100), nullable=True),
        sa.Column("detail", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_events_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_run_id_id"), "events", ["run_id", "id"])
    op.create_index(op.f("ix_events_kind_id"), "events", ["kind", "id"])
    # rounds and model_versions reference each other: rounds first without its two
    # references to model_versions, which are added once that table exists.
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("opened_at", _tz(), nullable=False),
        sa.Column("closed_at", _tz(), nullable=True),
        sa.Column("deadline", _tz(), nullable=True),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("base_version_id", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_rounds_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("run_id", "number", name=op.f("uq_rounds_run_id_number")),
        _check("state", ROUND_STATE, "ck_rounds_roundstate"),
    )
    op.create_index(op.f("ix_rounds_run_id_state"), "rounds", ["run_id", "state"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("blob_sha", sa.String(length=64), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_sha"], ["blobs.sha256"], name=op.f("fk_model_versions_blob_sha_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_model_versions_round_id_rounds"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_model_versions_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("round_id", name=op.f("uq_model_versions_round_id")),
        sa.UniqueConstraint("run_id", "version", name=op.f("uq_model_versions_run_id_version")),
    )
    with op.batch_alter_table("rounds") as batch:
        for column in ("base_version_id", "model_version_id"):
            batch.create_foreign_key(
                op.f(f"fk_rounds_{column}_model_versions"), "model_versions", [column], ["id"],
                ondelete="SET NULL",
            )
    op.create_table(
        "participations",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=True),
        sa.Column("update_sha", sa.String(length=64), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("train_time_s", sa.Double(), nullable=True),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("accuracy", sa.Double(), nullable=True),
        sa.Column("received_at", _tz(), nullable=True),
        sa.Column("message_id", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_participations_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_participations_round_id_rounds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["update_sha"], ["blobs.sha256"], name=op.f("fk_participations_update_sha_blobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("round_id", "client_id", name=op.f("pk_participations")),
        _check("state", PARTICIPATION_STATE, "ck_participations_participationstate"),
    )
    op.create_index(op.f("ix_participations_client_id"), "participations", ["client_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_participations_client_id"), table_name="participations")
    op.drop_table("participations")
    with op.batch_alter_table("rounds") as batch:
        for column in ("base_version_id", "model_version_id"):
            batch.drop_constraint(op.f(f"fk_rounds_{column}_model_versions"), type_="foreignkey")
    op.drop_table("model_versions")
    op.drop_index(op.f("ix_rounds_run_id_state"), table_name="rounds")
    op.drop_table("rounds")
    op.drop_index(op.f("ix_events_kind_id"), table_name="events")
    op.drop_index(op.f("ix_events_run_id_id"), table_name="events")
    op.drop_table("events")
    op.drop_index(op.f("ix_clients_run_id_state"), table_name="clients")
    op.drop_table("clients")
    op.drop_index(op.f("ix_processed_messages_ts"), table_name="processed_messages")
    op.drop_table("processed_messages")
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
    op.drop_table("runs")
