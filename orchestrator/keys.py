"""The orchestrator's signing key, loaded once per process from the database.

Every replica of one database reads the same row (``db.queries.keys``), so devices that
pinned the key at registration accept what any replica sends, and a restart keeps it.
Where the key lives and why: docs/architecture.md, "Signed control plane"."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries.keys import KEY_NAME, get_or_create_signing_key
from protocol.signing import Signer, encode_key, generate_key

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"


class SigningKeys:
    """The process's ``Signer``, made on first use (each caller may need it first: the
    outbox drained at start, or a registration's reply)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._signer: Signer | None = None
        self._lock = threading.Lock()

    def signer(self) -> Signer:
        with self._lock:
            if self._signer is None:
                # Its own transaction, committed before the caller opens one: on SQLite a
                # write inside a batch's transaction would wait for that transaction's lock.
                with session_scope(self.sessions) as s:
                    private, public = get_or_create_signing_key(
                        s, KEY_NAME, ALGORITHM, generate_key
                    )
                signer = Signer(private)
                if signer.public_key != encode_key(public):
                    raise ValueError("the stored signing key's public half does not match it")
                log.info("orchestrator signing key %s", signer.public_key)
                self._signer = signer
            return self._signer

    @property
    def public_key(self) -> str:
        return self.signer().public_key
