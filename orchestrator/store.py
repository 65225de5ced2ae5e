"""Steps of a run's machine inside one database transaction.

``step_run`` (one event) and ``step_many`` (a batch, in order, under one lock) lock the run
row, loads the ``Federation`` snapshot, steps it, saves it,
projects the effects onto the normalised tables (clients, rounds, participations, events)
and writes the side effects to the outbox. The caller owns the transaction: it commits, then
acknowledges the bus message, then drains the outbox (``orchestrator.outbox``).

The snapshot is saved in parts (``serde.changes``): a step writes the client records and
received updates it changed and the head only when that changed, so its cost does not grow
with the fleet. Loading it does (every part is read), so each process keeps the snapshot it
last saw in ``CACHE``, keyed by engine and run, with the ``runs.machine_seq`` it was saved or
read at. Every save bumps that number under the run lock, so a cached snapshot is used only
when the number read under the lock still equals its own: a save by any other process or
thread in between makes it a miss and the snapshot is read again (the number grows by a
random step, so no other snapshot of the run, not even one of a run made again under the
same id, can carry it). A snapshot a step made enters the cache only once its transaction
committed (a session event); a rollback drops it.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from db import queries as q
from db.queries import orchestrator as oq
from orchestrator.projection import (
    aggregate_task_id,
    evaluate_task_id,
    project,
    project_clients,
    ts,
    write_updates,
)
from orchestrator.state import (
    Effect,
    Federation,
    Ignored,
    Input,
    Rejected,
    serde,
    step,
)
from orchestrator.state.serde import changes, join

__all__ = [
    "CACHE",
    "SnapshotCache",
    "StepInput",
    "StepResult",
    "UpdateInfo",
    "aggregate_task_id",
    "evaluate_task_id",
    "load",
    "record_and_publish",
    "step_many",
    "step_run",
    "ts",
]


@dataclass(frozen=True)
class UpdateInfo:
    """What the ingest knows about a stored update beyond the machine's ``UpdateReceived``."""

    nbytes: int
    message_id: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    fed: Federation
    effects: list[Effect]

    @property
    def refusal(self) -> Rejected | Ignored | None:
        for e in self.effects:
            if isinstance(e, Rejected | Ignored):
                return e
        return None


class SnapshotCache:
    """Each run's latest known snapshot and its ``machine_seq``, per engine (database).

    An entry is only ever a committed pair: what a committed transaction saved or read at
    that sequence number. So it can be stale (the database moved on: a miss) but never wrong.

    Saves not yet committed are announced (``expect``) so that a thread of this process that
    takes the run lock right after another one's commit, before that one's after-commit hook
    had the GIL to publish, waits a moment for the entry (``wait_for``) instead of reading the
    whole snapshot again; it then still checks the entry's number like any other.
    """

    def __init__(self, max_runs: int = 256) -> None:
        self._lock = threading.Lock()
        self._engines: weakref.WeakKeyDictionary[Engine, dict[str, tuple[int, Federation]]] = (
            weakref.WeakKeyDictionary()
        )
        self._inflight: weakref.WeakKeyDictionary[
            Engine, dict[str, tuple[int, threading.Event]]
        ] = weakref.WeakKeyDictionary()
        self.max_runs = max_runs
        self.hits = 0
        self.misses = 0

    def get(self, engine: Engine, run_id: str, seq: int) -> Federation | None:
        with self._lock:
            entry = self._engines.get(engine, {}).get(run_id)
            if entry is not None and entry[0] == seq:
                self.hits += 1
                return entry[1]
            self.misses += 1
            return None

    def peek(self, engine: Engine, run_id: str) -> tuple[int, Federation] | None:
        """The run's entry whatever its number (for tests and diagnostics)."""
        with self._lock:
            return self._engines.get(engine, {}).get(run_id)

    def put(self, engine: Engine, run_id: str, seq: int, fed: Federation) -> None:
        """Keep ``fed`` as the run's snapshot at ``seq``. Last one in wins: should two
        threads publish out of order, the older pair only makes the next step a miss."""
        with self._lock:
            runs = self._engines.setdefault(engine, {})
            runs.pop(run_id, None)
            runs[run_id] = (seq, fed)
            while len(runs) > self.max_runs:
                del runs[next(iter(runs))]

    def drop(self, engine: Engine, run_id: str) -> None:
        with self._lock:
            self._engines.get(engine, {}).pop(run_id, None)

    def expect(self, engine: Engine, run_id: str, seq: int) -> None:
        """A transaction of this process saved the run as ``seq`` and has yet to end."""
        with self._lock:
            self._inflight.setdefault(engine, {})[run_id] = (seq, threading.Event())

    def settle(self, engine: Engine, run_id: str, seq: int) -> None:
        """That transaction ended (its entry is published if it committed)."""
        with self._lock:
            inflight = self._inflight.get(engine, {})
            entry = inflight.get(run_id)
            if entry is not None and entry[0] == seq:
                del inflight[run_id]
                entry[1].set()

    def wait_for(self, engine: Engine, run_id: str, seq: int, timeout: float) -> bool:
        """Wait until the transaction of this process that saved ``seq`` ended; False if
        none did (another process saved it)."""
        with self._lock:
            entry = self._inflight.get(engine, {}).get(run_id)
        if entry is None or entry[0] != seq:
            return False
        return entry[1].wait(timeout)

    def clear(self) -> None:
        with self._lock:
            self._engines.clear()


CACHE = SnapshotCache()

# Session.info key: {run_id: (engine, seq, fed, saved)} of snapshots this session's transaction
# saved (saved: True) or read, for the cache once (and only if) it commits.
_PENDING = "fedmq.snapshots"
# How long a step waits for another thread's commit to publish the snapshot it then finds.
_PUBLISH_WAIT_S = 1.0


def _engine(s: Session) -> Engine:
    bind = s.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def _pending(s: Session) -> dict[str, tuple[Engine, int, Federation, bool]]:
    pending: dict[str, tuple[Engine, int, Federation, bool]] = s.info.setdefault(_PENDING, {})
    return pending


def _end(s: Session, *, committed: bool) -> None:
    for run_id, (engine, seq, fed, saved) in s.info.pop(_PENDING, {}).items():
        if committed:
            CACHE.put(engine, run_id, seq, fed)
        else:
            CACHE.drop(engine, run_id)
        if saved:
            CACHE.settle(engine, run_id, seq)


@event.listens_for(Session, "after_commit")
def _publish(s: Session) -> None:
    if not s.in_nested_transaction():  # not a savepoint: the transaction committed
        _end(s, committed=True)


@event.listens_for(Session, "after_soft_rollback")
def _discard(s: Session, _tx: Any) -> None:
    _end(s, committed=False)


@event.listens_for(Session, "after_transaction_end")
def _ended(s: Session, tx: Any) -> None:
    if tx.parent is None:  # a transaction closed without a commit or rollback event
        _end(s, committed=False)


def _stored(s: Session, run_id: str, seq: int, *, locked: bool) -> tuple[Federation | None, bool]:
    """The run's snapshot at ``seq`` and whether it is stored split; (None, _) if the run
    has none. From this transaction's own saves, else the cache, else the database."""
    engine = _engine(s)
    mine = _pending(s).get(run_id)
    if mine is not None and mine[1] == seq:
        return mine[2], True
    cached = CACHE.get(engine, run_id, seq)
    if cached is None and locked and CACHE.wait_for(engine, run_id, seq, _PUBLISH_WAIT_S):
        cached = CACHE.get(engine, run_id, seq)
    if cached is not None:
        return cached, True
    while True:
        stored = oq.read_machine(s, run_id)
        if stored is None:
            return None, False
        read_seq, maybe_head, parts = stored
        if maybe_head is None:
            return None, False
        head = maybe_head
        if locked or oq.machine_seq(s, run_id) == read_seq:
            break  # unlocked: no save committed between the head and the parts
    fed = join(head, parts)
    split = serde.is_split(head)
    if split:
        _pending(s)[run_id] = (engine, read_seq, fed, False)
    return fed, split


def load(s: Session, run_id: str) -> Federation | None:
    """The run's snapshot, read without the lock (for the ticker's task follower)."""
    seq = oq.machine_seq(s, run_id)
    return None if seq is None else _stored(s, run_id, seq, locked=False)[0]


@dataclass(frozen=True)
class StepInput:
    """One input of ``step_many``: the machine's event and what to record it under."""

    event: Input
    message_id: str | None = None
    correlation_id: str | None = None
    update: UpdateInfo | None = None


def step_run(
    s: Session,
    run_id: str,
    event: Input,
    now: float,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    update: UpdateInfo | None = None,
) -> StepResult | None:
    """Step run ``run_id`` with ``event``; None if the run does not exist (or has no machine)."""
    results = step_many(s, run_id, [StepInput(event, message_id, correlation_id, update)], now)
    return None if results is None else results[0]


def step_many(
    s: Session, run_id: str, inputs: list[StepInput], now: float
) -> list[StepResult] | None:
    """Step run ``run_id`` through ``inputs`` in order, under one lock, saving once (a group
    commit's step); one ``StepResult`` per input. None if the run does not exist.

    Each input is projected as its own step (the round and participation rows see every
    step, as they would one message at a time); the client rows, the snapshot's parts and
    the event and outbox rows are written once for the whole batch.
    """
    seq = oq.lock_machine_seq(s, run_id)
    if seq is None:
        return None
    results: list[StepResult] = []
    try:
        old, split = _stored(s, run_id, seq, locked=True)
        if old is None:
            return None
        fed = old
        deferred: list[tuple[int, dict[str, Any]]] = []
        for inp in inputs:
            new, effects = step(fed, inp.event, now)
            if new is not fed:
                project(s, fed, new, effects, now, inp.update, (), deferred)
            results.append(StepResult(new, effects))
            fed = new
        write_updates(s, run_id, deferred)
        diff = changes(old if split else None, fed)
        if diff:
            new_seq = oq.save_machine_parts(s, run_id, seq, diff.head, diff.upserts, diff.deletes)
            engine = _engine(s)
            _pending(s)[run_id] = (engine, new_seq, fed, True)
            CACHE.expect(engine, run_id, new_seq)
            project_clients(s, old, fed, now, diff.clients)
    except BaseException:
        # Whatever this transaction saved for the run must not reach the cache.
        mine = _pending(s).pop(run_id, None)
        CACHE.drop(_engine(s), run_id)
        if mine is not None and mine[3]:
            CACHE.settle(mine[0], run_id, mine[1])
        raise
    _record(
        s,
        run_id,
        [(r.effects, i.message_id, i.correlation_id) for r, i in zip(results, inputs, strict=True)],
    )
    return results


def _record(
    s: Session, run_id: str, steps: list[tuple[list[Effect], str | None, str | None]]
) -> None:
    """Each effect as an event row and an outbox item to publish it (one INSERT each for
    the whole batch). ``steps``: each step's effects, message id and correlation id."""
    events: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for effects, message_id, correlation_id in steps:
        for effect in effects:
            detail = effect.detail()
            client_id = getattr(effect, "client_id", None)
            number = getattr(effect, "number", None)
            if number is None:
                number = getattr(effect, "round", None)
            events.append(
                {
                    "kind": effect.kind,
                    "client_id": client_id,
                    "round": number,
                    "message_id": message_id,
                    "detail": detail,
                }
            )
            items.append(
                {
                    "kind": effect.kind,
                    "client_id": client_id,
                    "round": number,
                    "correlation_id": correlation_id,
                    "detail": detail,
                }
            )
    oq.record_effects(s, run_id, events, items)


def record_and_publish(
    s: Session,
    run_id: str | None,
    kind: str,
    *,
    client_id: str | None = None,
    round: int | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """An event that is not a machine effect (a refused message, a command's result)."""
    known = run_id is not None and q.get_run(s, run_id) is not None
    detail = _storable(detail or {})
    q.record_event(
        s,
        kind,
        run_id=run_id if known else None,
        client_id=client_id,
        round=round,
        message_id=message_id,
        detail=detail or {},
    )
    oq.add_outbox(
        s,
        run_id,
        "event",
        {
            "kind": kind,
            "client_id": client_id,
            "round": round,
            "correlation_id": correlation_id,
            "detail": detail or {},
        },
    )


def _storable(value: Any) -> Any:
    """``value`` with NUL characters replaced: refusal reasons quote hostile input, and
    Postgres JSON cannot hold ``\\u0000`` (the insert would fail and the refusal go
    unrecorded; tests/faults/test_bad_input.py found it)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value
