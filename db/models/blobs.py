"""Content-addressed blobs (models and updates), stored as fixed-size chunk rows.

Chunks keep a 1 GiB model from ever being one giant row or one giant bind parameter;
reads and writes then need only one chunk in memory at a time.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.enums import BlobKind
from db.models.types import utcnow


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[BlobKind]
    # Stored so a read can tell a missing chunk from a short blob.
    chunk_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Blob(sha256={self.sha256[:12]!r}…, size={self.size}, kind={self.kind!r})"


class BlobChunk(Base):
    __tablename__ = "blob_chunks"

    sha256: Mapped[str] = mapped_column(
        ForeignKey("blobs.sha256", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(primary_key=True)
    # Postgres: STORAGE EXTERNAL (migration 0010): zstd frames gain nothing from pglz.
    data: Mapped[bytes] = mapped_column(LargeBinary)
