"""A thread that writes its process's heartbeat row (``service_health``) every few seconds.

Any process with a database may run one (orchestrator, worker, gateway): ``probe`` says how
the process is doing (``protocol.bus.health.summary`` of its connections) and the row is
upserted with it. A write that fails (the database away) is skipped, not fatal: the row goes
stale, which the dashboard shows, and the next write catches up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries.health import HealthRow, forget_health, record_health, remove_health

log = logging.getLogger(__name__)

# A row not written for this long belongs to a process long gone.
FORGET_AFTER = timedelta(days=1)


def host() -> str:
    return socket.gethostname().split(".")[0][:64]


def row_from_summary(name: str, kind: str, summary: dict[str, Any]) -> HealthRow:
    """A heartbeat row from ``protocol.bus.health.summary``'s dict."""
    since = summary.get("since")
    return HealthRow(
        name=name,
        kind=kind,
        host=host(),
        pid=os.getpid(),
        state=str(summary.get("state", "connected")),
        since=None if since is None else datetime.fromtimestamp(float(since), UTC),
        attempts=int(summary.get("attempts", 0)),
        failures=int(summary.get("failures", 0)),
        reconnects=int(summary.get("reconnects", 0)),
        detail={k: v for k, v in summary.items() if k not in _COLUMNS},
    )


_COLUMNS = {"state", "since", "attempts", "failures", "reconnects"}


class HealthReporter:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        name: str,
        kind: str,
        probe: Callable[[], dict[str, Any]],
        *,
        period_s: float = 5.0,
    ) -> None:
        self.sessions, self.name, self.kind = sessions, name[:160], kind
        self.probe, self.period_s = probe, period_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> HealthReporter:
        self._thread = threading.Thread(target=self._run, name="fedmq-health", daemon=True)
        self._thread.start()
        return self

    def write_now(self) -> None:
        """Write at once (a state change worth showing before the next period)."""
        self._wake.set()

    def stop(self, *, remove: bool = False) -> None:
        """Stop writing; with ``remove`` the row goes too (a clean exit), else it is written
        once more as ``stopped``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with session_scope(self.sessions) as s:
                if remove:
                    remove_health(s, self.name)
                else:
                    record_health(s, row_from_summary(self.name, self.kind, {"state": "stopped"}))
        except Exception as e:
            log.warning("health row %s: last write failed (%s)", self.name, e)

    def write(self) -> None:
        summary = self.probe()
        with session_scope(self.sessions) as s:
            record_health(s, row_from_summary(self.name, self.kind, summary))
            forget_health(s, datetime.now(UTC) - FORGET_AFTER)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write()
                if self._failing:
                    log.warning("health row %s: written again", self.name)
                self._failing = False
            except Exception as e:
                if not self._failing:  # one line per outage, not one per period
                    log.warning("health row %s: cannot write (%s); will retry", self.name, e)
                self._failing = True
            self._wake.wait(self.period_s)
            self._wake.clear()
