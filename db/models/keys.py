"""The orchestrator's signing key (protocol/signing.py): one row, shared by every replica.

Why the database and not a key file: see docs/architecture.md, "Signed control plane"."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import utcnow


class SigningKey(Base):
    """A named key pair, raw bytes (Ed25519: 32 each). The first orchestrator to start
    inserts it; every later one (a restart, another replica) reads the same row."""

    __tablename__ = "signing_keys"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    private_key: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
