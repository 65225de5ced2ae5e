"""Clients: registration, state, liveness."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.models import Client, ClientState, utcnow
from db.queries._sql import changed, in_states


def hash_token(token: str) -> str:
    """What is stored for a client's bearer token. Tokens are long random strings, so a
    plain SHA-256 suffices (a slow password hash protects guessable secrets only)."""
    return hashlib.sha256(token.encode()).hexdigest()


def register_client(
    session: Session,
    run_id: str,
    display_name: str,
    token_hash: str,
    device_info: dict[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> str:
    """Add a client in state ``join``; returns its new de-identified id (uuid4 hex)."""
    now = now or utcnow()
    client = Client(
        id=uuid.uuid4().hex,
        run_id=run_id,
        display_name=display_name,
        token_hash=token_hash,
        device_info=device_info or {},
        joined_at=now,
        last_seen=now,
    )
    session.add(client)
    session.flush()
    return client.id


def register_clients(
    session: Session,
    run_id: str,
    entries: list[tuple[str, str, dict[str, Any]]],
    *,
    now: datetime | None = None,
) -> list[str]:
    """``register_client`` for a batch of (display name, token hash, device info), in one
    INSERT; their new ids in order."""
    now = now or utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": uuid.uuid4().hex,
            "run_id": run_id,
            "display_name": name,
            "token_hash": token_hash,
            "device_info": info or {},
            "joined_at": now,
            "last_seen": now,
        }
        for name, token_hash, info in entries
    ]
    if rows:
        session.execute(insert(Client), rows)
    return [r["id"] for r in rows]


def get_client(session: Session, client_id: str) -> Client | None:
    return session.get(Client, client_id)


def get_clients(session: Session, client_ids: Iterable[str]) -> dict[str, Client]:
    """The clients of ``client_ids`` that exist, by id, in one query."""
    ids = list(set(client_ids))
    if not ids:
        return {}
    return {c.id: c for c in session.scalars(select(Client).where(Client.id.in_(ids)))}


def count_run_clients(session: Session, run_id: str) -> int:
    """Every client row of the run, whatever its state (a run's registration cap counts
    them all: each is a row and a part of the run's snapshot)."""
    stmt = select(func.count()).select_from(Client).where(Client.run_id == run_id)
    return int(session.scalar(stmt) or 0)


def get_client_by_token_hash(session: Session, token_hash: str) -> Client | None:
    return session.scalar(select(Client).where(Client.token_hash == token_hash))


def set_client_state(
    session: Session,
    client_id: str,
    state: ClientState,
    *,
    expected: ClientState | Iterable[ClientState] | None = None,
) -> bool:
    """Move a client to ``state``; with ``expected``, only from that state (or those).

    Does not touch last_seen: going offline for silence is not a sign of life.
    """
    stmt = update(Client).where(Client.id == client_id).values(state=state)
    if expected is not None:
        stmt = stmt.where(in_states(Client.state, expected))
    return changed(session, stmt) == 1


def touch_client(session: Session, client_id: str, *, now: datetime | None = None) -> bool:
    """Record a sign of life (heartbeat, signal, update). Returns whether the client exists."""
    stmt = update(Client).where(Client.id == client_id).values(last_seen=now or utcnow())
    return changed(session, stmt) == 1


def list_clients(
    session: Session,
    run_id: str,
    state: ClientState | Iterable[ClientState] | None = None,
) -> list[Client]:
    stmt = select(Client).where(Client.run_id == run_id)
    if state is not None:
        stmt = stmt.where(in_states(Client.state, state))
    return list(session.scalars(stmt.order_by(Client.joined_at, Client.id)))


def count_clients_by_state(session: Session, run_id: str) -> dict[ClientState, int]:
    """For the dashboard's status panel; states with no client are absent."""
    rows = session.execute(
        select(Client.state, func.count()).where(Client.run_id == run_id).group_by(Client.state)
    )
    return {state: n for state, n in rows}


def mark_silent_offline(session: Session, run_id: str, seen_before: datetime) -> list[str]:
    """Take clients not heard from since ``seen_before`` offline; returns their ids."""
    stmt = (
        update(Client)
        .where(
            Client.run_id == run_id,
            Client.last_seen < seen_before,
            Client.state != ClientState.OFFLINE,
        )
        .values(state=ClientState.OFFLINE)
        .returning(Client.id)
    )
    return sorted(session.scalars(stmt))
