"""Blob bytes stored without Postgres's own compression (``STORAGE EXTERNAL``).

Update and model blobs are zstd frames behind a JSON header: pglz (TOAST's default for
values over 2 KB) found the header compressible, went on through the whole incompressible
frame and gave up at the end, for every 1 MB chunk. That cost a third of the database's
write rate (60 against 178 MB/s of such chunks, measured 2026-12-07). EXTERNAL keeps the
values out of line, uncompressed. It applies to rows written from now on.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("blob_chunks", "upload_chunks")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite stores bytes as they come
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN data SET STORAGE EXTENDED")
