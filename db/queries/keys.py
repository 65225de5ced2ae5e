"""The orchestrator's signing key: read it, or insert the one the caller made."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import SigningKey
from db.queries._sql import insert_ignore

# The row the orchestrator keeps its signing key in; the gateway reads its public half.
KEY_NAME = "orchestrator"


def get_or_create_signing_key(
    session: Session, name: str, algorithm: str, generate: Callable[[], tuple[bytes, bytes]]
) -> tuple[bytes, bytes]:
    """(private, public) of the key ``name``; made with ``generate`` when there is none.

    Two processes starting at once both generate, one insert wins (the other's waits for it
    on Postgres and then does nothing; SQLite serialises writers), and both return the
    winner's row: every replica signs with one key."""
    row = session.get(SigningKey, name)
    if row is None:
        private, public = generate()
        insert_ignore(
            session,
            SigningKey,
            {"name": name, "algorithm": algorithm, "private_key": private, "public_key": public},
            ["name"],
        )
        row = session.get(SigningKey, name, populate_existing=True)
    assert row is not None
    if row.algorithm != algorithm:
        raise ValueError(f"signing key {name!r} is {row.algorithm}, expected {algorithm}")
    return bytes(row.private_key), bytes(row.public_key)


def get_public_key(session: Session, name: str) -> bytes | None:
    """Only the public half of the key ``name`` (None before an orchestrator made it)."""
    return session.scalar(select(SigningKey.public_key).where(SigningKey.name == name))
