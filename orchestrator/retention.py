"""Retention (issue 17, finding 6): sent outbox rows, old events and old de-duplication ids
are deleted, so that the database stops growing with the rounds (60k outbox rows and 51k
events, 305 MB, after ~2,000 rounds before this).

- **What.** Outbox rows sent more than ``outbox_s`` ago (unsent rows are never touched);
  events older than ``events_s``; beyond that, only the newest ``events_per_run`` events of
  each run, and as many of the events that name no run (refusals of unknown runs, malformed
  messages, dropped dead letters: what an outsider can make); ``processed_messages`` ids
  older than ``processed_s`` (a re-delivery comes within minutes, not days).
- **Who.** A run's own events are pruned by the replica that holds the run's lease (with its
  other housekeeping, orchestrator/replicas.py). The rest belongs to no run: one replica at
  a time prunes it, the one that wins a transaction-level advisory lock (Postgres; SQLite is
  one process); the others skip that pass.
- **How.** Batches of ``batch`` rows, each its own short transaction, oldest first, each
  found through an index (db/queries/retention.py), at most ``max_batches`` a pass: a prune
  never holds a long lock, and a large backlog (the first pass after an upgrade) is worked
  off over several passes.

The dashboard reads rounds, clients and model versions from their own tables; only the
event feed and "last updated" read ``events``, and both read the newest, which stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries import retention as rq

log = logging.getLogger(__name__)

# Key of the advisory lock the one replica pruning shared tables holds (ASCII "fedr", 0).
_PRUNE_LOCK = (0x66656472, 0)


@dataclass(frozen=True)
class Retention:
    outbox_s: float = 3600.0
    events_s: float = 7 * 86400.0
    events_per_run: int = 100_000
    processed_s: float = 86400.0
    interval_s: float = 60.0
    batch: int = 5000
    max_batches: int = 100  # per table and pass


@dataclass
class Pruned:
    outbox: int = 0
    events: int = 0
    processed: int = 0

    def __bool__(self) -> bool:
        return bool(self.outbox or self.events or self.processed)


class Pruner:
    def __init__(self, sessions: sessionmaker[Session], retention: Retention) -> None:
        self.sessions = sessions
        self.r = retention

    def _batches(self, delete_batch: Callable[[Session], int]) -> int:
        total = 0
        for _ in range(self.r.max_batches):
            with session_scope(self.sessions) as s:
                n = delete_batch(s)
            total += n
            if n < self.r.batch:
                break
        return total

    def prune_shared(self, now: datetime | None = None) -> Pruned | None:
        """Outbox, old events, run-less events, de-duplication ids; None if another
        replica is pruning them now."""
        now = now or datetime.now(UTC)
        r = self.r
        with session_scope(self.sessions) as held:
            if not _try_lock(held):
                return None
            done = Pruned()
            done.outbox = self._batches(
                lambda s: rq.prune_sent_outbox(s, now - timedelta(seconds=r.outbox_s), r.batch)
            )
            done.events = self._batches(
                lambda s: rq.prune_old_events(s, now - timedelta(seconds=r.events_s), r.batch)
            )
            done.events += self.prune_run_events(None)
            done.processed = self._batches(
                lambda s: rq.prune_processed_before(
                    s, now - timedelta(seconds=r.processed_s), r.batch
                )
            )
        if done:
            log.info(
                "pruned %d sent outbox rows, %d events, %d message ids",
                done.outbox,
                done.events,
                done.processed,
            )
        return done

    def prune_run_events(self, run_id: str | None) -> int:
        """Keep the newest ``events_per_run`` events of ``run_id`` (None: of no run)."""
        with session_scope(self.sessions) as s:
            upto = rq.events_over(s, run_id, self.r.events_per_run)
        if upto is None:
            return 0
        return self._batches(lambda s: rq.prune_events_upto(s, run_id, upto, self.r.batch))

    def prune_runs(self, run_ids: Iterable[str]) -> int:
        return sum(self.prune_run_events(r) for r in run_ids)


def _try_lock(session: Session) -> bool:
    """Postgres: the prune lock for this transaction, if no other replica holds it."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(
        session.scalar(
            text("SELECT pg_try_advisory_xact_lock(:k1, :k2)"),
            {"k1": _PRUNE_LOCK[0], "k2": _PRUNE_LOCK[1]},
        )
    )
