"""How a connection to a broker (or a database) is doing, for people and dashboards.

A ``LinkHealth`` is owned by whatever loops on a connection (a bus consumer, the bus's
publishing calls, a Postgres listener) and read from any thread: its state, since when,
the failed attempts in a row of the current outage, and two counters that only grow
(failed attempts and reconnections), so that an outage shows as "reconnecting since T,
attempt N" instead of as silence, and a flapping link shows in the counters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class LinkState(StrEnum):
    CONNECTING = "connecting"  # never connected yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # was connected (or tried), now trying again
    STOPPED = "stopped"  # closed on purpose
    FAILED = "failed"  # gave up: retrying cannot help (credentials, a deleted queue)


# Worst first: a service is as healthy as its worst link.
_ORDER = [LinkState.FAILED, LinkState.RECONNECTING, LinkState.CONNECTING, LinkState.CONNECTED]


@dataclass(frozen=True)
class HealthSnapshot:
    name: str
    state: LinkState
    since: float  # time.time() when the link entered ``state``
    attempts: int  # failed attempts in a row (0 while connected)
    failures: int  # failed attempts, ever
    reconnects: int  # outages recovered from, ever
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d


class LinkHealth:
    def __init__(self, name: str, clock: Any = time.time) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = LinkState.CONNECTING
        self._since = clock()
        self._attempts = 0
        self._failures = 0
        self._reconnects = 0
        self._error: str | None = None

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def attempts_in_a_row(self) -> int:
        return self._attempts

    def up(self) -> None:
        """Connected (again)."""
        with self._lock:
            if self._state is LinkState.CONNECTED:
                return
            if self._state is LinkState.RECONNECTING:
                self._reconnects += 1
            self._set(LinkState.CONNECTED)
            self._attempts = 0

    def down(self, error: BaseException | str) -> int:
        """An attempt failed (or the connection was lost); returns the attempts in a row."""
        with self._lock:
            if self._state is LinkState.CONNECTED:
                self._set(LinkState.RECONNECTING)
            elif self._state is LinkState.CONNECTING and self._failures == 0:
                self._since = self._clock()  # trying since the first failure, not creation
            self._attempts += 1
            self._failures += 1
            self._error = describe(error)
            return self._attempts

    def stopped(self) -> None:
        with self._lock:
            self._set(LinkState.STOPPED)

    def failed(self, error: BaseException | str) -> None:
        with self._lock:
            self._set(LinkState.FAILED)
            self._error = describe(error)

    def _set(self, state: LinkState) -> None:
        if state is not self._state:
            self._state, self._since = state, self._clock()

    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            return HealthSnapshot(
                self.name,
                self._state,
                self._since,
                self._attempts,
                self._failures,
                self._reconnects,
                self._error,
            )


def describe(error: BaseException | str) -> str:
    """One short line for a log or a dashboard: the exception's type and message, never a
    traceback (the traceback of a reconnect is logged at DEBUG only)."""
    if isinstance(error, str):
        return error[:300]
    text = str(error).strip().splitlines()
    if not text and error.args:  # pika's AMQPConnectionError: the cause is its argument
        text = [str(a) or repr(a) for a in error.args]
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:300] if first else type(error).__name__


def worst(snapshots: Iterable[HealthSnapshot]) -> HealthSnapshot | None:
    """The link that says most about a service: the worst state, the oldest in it.
    Stopped links are left out (a consumer stopped on purpose is not a fault)."""
    live = [s for s in snapshots if s.state is not LinkState.STOPPED]
    if not live:
        return None
    return min(live, key=lambda s: (_ORDER.index(s.state), s.since))


def summary(snapshots: Iterable[HealthSnapshot]) -> dict[str, Any]:
    """A service's state, worst link first, plus its links and the summed counters: what a
    heartbeat row carries."""
    snaps = list(snapshots)
    w = worst(snaps)
    return {
        "state": str(w.state) if w else str(LinkState.CONNECTED),
        "since": w.since if w else None,
        "attempts": w.attempts if w else 0,
        "failures": sum(s.failures for s in snaps),
        "reconnects": sum(s.reconnects for s in snaps),
        "last_error": w.last_error if w else None,
        "links": [s.to_dict() for s in snaps],
    }
