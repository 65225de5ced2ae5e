"""A split run's round attempt as its edge session sees it.

The orchestrator sends one ``fedmq.edge.session`` task per round attempt of a split run
(``orchestrator.edge``). Its outbox may send a task twice (a drainer that died between
sending and marking), and a broker may deliver it twice; a second session for the same
attempt would be harmful: one started after the first ended serves nobody, and would then
store an untrained body over the trained one. So a session is claimed once, under the round
row's lock: the claim is an ``edge.session.started`` event naming the session id, and a
task finding one, or finding the attempt already over, serves nothing.

While it serves, ``AttemptWatch`` follows the round row: once the attempt is no longer open
(closed with its updates in, failed, or superseded by a retry) no device of it will come,
and the session ends instead of waiting out its idle timeout.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import queries as q
from db.engine import session_scope
from db.models import Round
from db.models.enums import RoundState

log = logging.getLogger(__name__)

SESSION_STARTED = "edge.session.started"
SESSION_DONE = "edge.session.done"


def claim(
    factory: sessionmaker[Session], run_id: str, round_number: int, attempt: int, session_id: str
) -> str | None:
    """Claim the session of ``attempt`` of round ``round_number``; the reason it is not this
    task's to serve, or None once claimed."""
    with session_scope(factory) as s:
        rnd = q.get_round(s, run_id, round_number)
        if rnd is None:
            return f"run {run_id} has no round {round_number}"
        row = s.get_one(Round, rnd.id, with_for_update=True, populate_existing=True)
        if row.attempt != attempt or row.state != RoundState.OPEN:
            return f"attempt {attempt} of round {round_number} is over ({row.state.value})"
        started = q.list_events(s, run_id, kinds=[SESSION_STARTED], limit=1000)
        if any(e.round == round_number and e.detail.get("session_id") == session_id
               for e in started):  # fmt: skip
            return f"session {session_id} was started already"
        q.record_event(
            s,
            SESSION_STARTED,
            run_id=run_id,
            round=round_number,
            detail={"session_id": session_id, "attempt": attempt, "pid": os.getpid()},
        )
    return None


def record_done(
    factory: sessionmaker[Session], run_id: str, round_number: int, result: dict[str, Any]
) -> None:
    """The session's figures as an event (the run's audit trail and simulation reports)."""
    detail = {
        k: v for k, v in result.items() if v is None or isinstance(v, str | int | float | bool)
    }
    with session_scope(factory) as s:
        q.record_event(s, SESSION_DONE, run_id=run_id, round=round_number, detail=detail)


def attempt_open(
    factory: sessionmaker[Session], run_id: str, round_number: int, attempt: int
) -> bool:
    with session_scope(factory) as s:
        rnd = q.get_round(s, run_id, round_number)
        return rnd is not None and rnd.attempt == attempt and rnd.state == RoundState.OPEN


class AttemptWatch:
    """Calls ``stop`` once the attempt is no longer open (polled every ``period_s``)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        run_id: str,
        round_number: int,
        attempt: int,
        stop: Callable[[], None],
        period_s: float = 0.5,
    ) -> None:
        self._args = (factory, run_id, round_number, attempt)
        self._stop_session = stop
        self._period_s = period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-attempt-watch", daemon=True)

    def __enter__(self) -> AttemptWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self._period_s):
            try:
                still = attempt_open(*self._args)
            except Exception as e:  # the database away a moment: look again
                log.warning("edge session: could not read the round (%s)", e)
                continue
            if not still:
                _, run_id, number, attempt = self._args
                log.info("run %s round %s attempt %s is over; ending its session",
                         run_id, number, attempt)  # fmt: skip
                self._stop_session()
                return
