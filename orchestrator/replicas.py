"""Replicas: several orchestrator processes on one database and broker share the runs.

Each ``OrchestratorService`` is a replica with an id of its own. A run's machine work (ticks,
following its tasks, counting its stored updates, its housekeeping) is done by the replica
that holds the run's lease (``run_leases``), so that one process steps a run most of the time
and its snapshot cache stays warm. What does not need the machine's owner goes on anywhere:
ingest stores updates off the run lock, signals and commands step the machine under the run
lock from whichever process consumes them. Leases are only about sharing the work: every step
still holds the run's row lock, so two replicas that both believe they hold a run (one that
stalled past its lease) are slower, never wrong.

Every ``renew_s`` (with a little jitter, so replicas do not fall into step) a replica, in one
transaction on the database's clock: marks itself seen, renews its leases for ``ttl_s``,
counts the live replicas and the runs, hands back what it holds beyond its fair share and
claims unowned or expired runs up to it (``plan``), each claim a conditional upsert that only
one replica can win. Fair share: between ``floor(runs / replicas)`` and ``ceil(runs /
replicas)`` runs each; a replica that joins gets its share from the others within a couple
of renewals. Runs are ranked per replica by rendezvous hashing, so that a replica claims and
keeps the same runs across hand-overs and two replicas seldom reach for the same one.

On Postgres each replica also keeps a connection of its own (``db.listen``) that holds a
session advisory lock for as long as the process lives: a replica whose lock is gone (its
process killed: the kernel closes its socket, Postgres drops the lock at once) is dead to the
others at their next renewal, and its runs are taken then, not a lease's time later; ``ttl_s``
is what covers a replica that hangs or loses its host. The same connection LISTENs for
updates stored by any replica (``INBOX_CHANNEL``: the owner counts them at once) and for
leases handed back (``LEASES_CHANNEL``: the others look again at once). SQLite is one process
(embedded mode): one replica holding every run, as before replicas existed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries import leases as lq
from db.queries import orchestrator as oq
from protocol.bus.health import HealthSnapshot

log = logging.getLogger(__name__)

# A replica not seen for this many lease times is forgotten (its row deleted).
FORGET_AFTER_TTLS = 12
# Wake-ups (a notification, a new run) refresh at most this often.
MIN_REFRESH_S = 0.05


def new_replica_id() -> str:
    """Host, pid and a random suffix: unique, and says where to look when it misbehaves."""
    host = socket.gethostname().split(".")[0][:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _rank(replica_id: str, run_id: str) -> int:
    """Rendezvous score: each replica prefers the runs it scores highest."""
    return int.from_bytes(hashlib.sha256(f"{replica_id}/{run_id}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Plan:
    claim: list[str]
    release: list[str]
    target: int


def plan(
    me: str,
    runs: Sequence[str],
    live: Collection[str],
    held: Mapping[str, str],
    orphans: Collection[str] = (),
) -> Plan:
    """What replica ``me`` claims and hands back so that ``runs`` spread over the ``live``
    replicas: between ``lo = floor(runs / replicas)`` and ``hi = ceil(runs / replicas)``
    each. ``held``: run -> holder of every lease still valid (expired ones and those of dead
    replicas left out: they are free). ``orphans``: free runs that were free at the previous
    renewal too, claimed whatever the share (nobody else took them).

    A replica claims up to ``hi``, unless a live replica holds fewer than ``lo`` (one that
    just joined): then it claims up to ``lo`` and hands back down to ``lo``, so what it hands
    back goes to the newcomer, not back to itself or its peers at ``hi``.
    """
    everyone = set(live) | {me}
    n, k = len(runs), len(everyone)
    lo, hi = n // k, -(-n // k)
    counts: Counter[str] = Counter(held[r] for r in runs if r in held)
    mine = [r for r in runs if held.get(r) == me]
    short = any(counts[x] < lo for x in everyone if x != me)
    target = lo if short else hi
    if len(mine) > target:
        surplus = sorted(mine, key=lambda r: _rank(me, r))[: len(mine) - target]
        return Plan([], surplus, target)
    free = sorted((r for r in runs if r not in held), key=lambda r: -_rank(me, r))
    claim = free[: target - len(mine)]
    claim += [r for r in free[len(claim) :] if r in orphans]
    return Plan(claim, [], target)


@dataclass(frozen=True)
class Change:
    gained: frozenset[str]
    lost: frozenset[str]


class Leases:
    """This replica's run leases, renewed by a thread of their own (``start``/``stop``)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        replica_id: str | None = None,
        ttl_s: float = 5.0,
        renew_s: float = 1.0,
        on_gain: Callable[[frozenset[str]], None] = lambda _: None,
        on_inbox: Callable[[str], None] = lambda _: None,
        info: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        if renew_s >= ttl_s:
            raise ValueError(f"lease_renew_s ({renew_s}) must be below lease_ttl_s ({ttl_s})")
        self.sessions = sessions
        self.id = replica_id or new_replica_id()
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self._on_gain = on_gain
        self._on_inbox = on_inbox
        self._info = info
        self._lock = threading.Lock()
        self._owned: frozenset[str] = frozenset()
        self._valid_until = 0.0  # time.monotonic() past which our leases may be another's
        self._seen: frozenset[str] = frozenset()  # the runs the last renewal saw
        self._free: frozenset[str] = frozenset()  # ... and those of them nobody held
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Any = None
        self._started = False
        self.refreshes = 0

    # --- what the service asks ----------------------------------------------------------

    def owned(self) -> frozenset[str]:
        """The runs this replica holds; none once its leases may have expired unrenewed
        (the database away longer than a lease): another replica may hold them by then."""
        with self._lock:
            if time.monotonic() > self._valid_until:
                return frozenset()
            return self._owned

    def owns(self, run_id: str) -> bool:
        return run_id in self.owned()

    def health(self) -> list[HealthSnapshot]:
        """The Postgres listener's connection (none on SQLite)."""
        return [] if self._listener is None else [self._listener.health.snapshot()]

    def notice(self, run_ids: Collection[str]) -> None:
        """The service saw these runs: one the last renewal did not see (a new run) gets
        a renewal now, so that a run is owned, and ticked, within a tick of its creation."""
        if not set(run_ids) <= self._seen:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, *, renew: bool = True) -> None:
        """Listen (Postgres), take the first leases, then renew in the background (unless
        ``renew`` is False: tests call ``refresh`` themselves)."""
        self._started = True
        engine = _engine(self.sessions)
        if engine.dialect.name == "postgresql":
            from db.listen import Listener

            self._listener = Listener(
                engine,
                [lq.INBOX_CHANNEL, lq.LEASES_CHANNEL],
                self._notified,
                setup=[lq.replica_lock_sql(self.id)],
                on_connect=self._reconnected,
                name=f"fedmq-replica-{self.id}"[:63],
            )
            self._listener.start()
        try:
            self.refresh()
        except Exception:
            log.exception("replica %s: taking the first leases failed; retrying", self.id)
        if renew:
            self._thread = threading.Thread(
                target=self._loop, name="orchestrator-leases", daemon=True
            )
            self._thread.start()
        log.info("replica %s started, holding %d runs", self.id, len(self._owned))

    def stop(self) -> None:
        """Hand every lease back and say so, so the others take the runs at once."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with session_scope(self.sessions) as s:
                lq.release_leases(s, self.id)
                lq.forget_replica(s, self.id)
                lq.notify(s, lq.LEASES_CHANNEL, [self.id])
        except Exception:
            log.exception("replica %s: handing back its leases failed", self.id)
        with self._lock:
            self._owned = frozenset()
        if self._listener is not None:
            self._listener.stop()

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            # Jitter: replicas started together would otherwise renew in step forever.
            period = self.renew_s * random.uniform(0.85, 1.0)
            woken = self._wake.wait(max(0.0, last + period - time.monotonic()))
            if self._stop.is_set():
                return
            if woken:
                self._stop.wait(MIN_REFRESH_S)  # gather a burst of wake-ups into one
            self._wake.clear()
            last = time.monotonic()
            try:
                self.refresh()
            except Exception as e:
                # A deadlock between two renewals (each claiming a lease the other renews)
                # or the database away: the next renewal tries again.
                log.warning("replica %s: renewing leases failed (%r)", self.id, e)

    def _notified(self, channel: str, payload: str) -> None:
        if channel == lq.INBOX_CHANNEL:
            if self.owns(payload):
                self._on_inbox(payload)
        elif payload != self.id:
            self.wake()

    def _reconnected(self) -> None:
        # Notifications sent while the connection was down are lost: look at everything.
        self.wake()
        for run_id in self.owned():
            self._on_inbox(run_id)

    # --- the renewal --------------------------------------------------------------------

    def refresh(self) -> Change:
        """One renewal (see the module's docstring); returns the runs gained and lost."""
        started = time.monotonic()
        with session_scope(self.sessions) as s:
            now = lq.db_now(s)
            until = lq.expiry(now, self.ttl_s)
            joined = lq.heartbeat(s, self.id, now, self._info())
            lq.forget_replicas(s, now - timedelta(seconds=FORGET_AFTER_TTLS * self.ttl_s))
            connected = lq.connected_replicas(s)
            live = {
                r.id
                for r in lq.live_replicas(s, now - timedelta(seconds=self.ttl_s))
                if connected is None or lq.replica_lock_key(r.id) in connected or r.id == self.id
            }
            runs = oq.active_run_ids(s)
            mine = lq.renew_leases(s, self.id, until)
            held: dict[str, str] = {}
            dead: set[str] = set()
            for lease in lq.leases(s):
                if lease.replica_id == self.id:
                    if lease.run_id in mine:
                        held[lease.run_id] = self.id
                elif lease.replica_id not in live:
                    dead.add(lease.replica_id)  # free, whatever its expiry says
                elif lease.expires_at >= now:
                    held[lease.run_id] = lease.replica_id
            free = frozenset(r for r in runs if r not in held)
            p = plan(self.id, runs, live, held, orphans=free & self._free)
            if p.release:
                lq.release_leases(s, self.id, p.release)
                mine -= set(p.release)
            gained = lq.claim_leases(s, self.id, p.claim, now, until, dead=dead)
            mine |= gained
            if p.release or joined:
                lq.notify(s, lq.LEASES_CHANNEL, [self.id])
        active = set(runs)
        with self._lock:
            before = self._owned if time.monotonic() <= self._valid_until else frozenset()
            self._owned = frozenset(mine & active)
            self._valid_until = started + self.ttl_s
            self._seen = frozenset(active)
            self._free = free - gained
            self.refreshes += 1
            change = Change(self._owned - before, before - self._owned)
        if change.gained or change.lost:
            log.info(
                "replica %s: +%d -%d runs, holding %d of %d (%d replicas)",
                self.id,
                len(change.gained),
                len(change.lost),
                len(self._owned),
                len(active),
                len(live),
            )
        if change.gained:
            self._on_gain(change.gained)
        return change


def _engine(sessions: sessionmaker[Session]) -> Engine:
    bind = sessions.kw.get("bind")
    assert isinstance(bind, Engine), "the sessionmaker must be bound to an engine"
    return bind
