"""A Postgres connection of its own that LISTENs on channels and hands each notification to a
callback, from a thread of its own; reconnects for as long as it runs, with capped and
jittered backoff, when the connection drops (one WARNING line per attempt; its state is in
``health``).

Notifications are a hint, never the only path: one sent while the connection was down is
lost, so ``on_connect`` runs after every (re)connection for the caller to look at what it
may have missed (and, with ``setup``, take what must live exactly as long as the
connection, such as a session advisory lock).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine

from protocol.bus.health import LinkHealth, describe

log = logging.getLogger(__name__)


def conninfo(engine: Engine) -> str:
    """The engine's database as a libpq URL (psycopg's own, without SQLAlchemy's driver)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    def __init__(
        self,
        engine: Engine,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        *,
        setup: Sequence[tuple[str, dict[str, Any]]] = (),
        on_connect: Callable[[], None] | None = None,
        name: str = "pg-listener",
    ) -> None:
        self._url = conninfo(engine)
        self._channels = list(channels)
        self._on_notify = on_notify
        self._setup = list(setup)
        self._on_connect = on_connect
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.connected = threading.Event()
        self.health = LinkHealth(f"postgres {name}")

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; waits (up to ``timeout``) for the first connection, so that what
        ``setup`` takes is held before the caller goes on."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self.connected.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close()
        self.health.stopped()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the listening connection", exc_info=True)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, application_name=self._name)
        for sql, params in self._setup:
            row = conn.execute(sql, params).fetchone()
            if row is not None and row[0] is False:
                # A try-lock another session holds: two processes given one replica id.
                log.error("%s: %s returned false on connecting", self._name, sql)
        for channel in self._channels:
            conn.execute(f'LISTEN "{channel}"')
        return conn

    def _deliver(self, channel: str, payload: str) -> None:
        try:
            self._on_notify(channel, payload)
        except Exception:
            log.exception("handling a notification on %s failed", channel)

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
                self.connected.set()
                if self.health.attempts_in_a_row:
                    log.warning("%s: listening again", self._name)
                self.health.up()
                delay = 0.2
                if self._on_connect is not None:
                    self._on_connect()
                while not self._stop.is_set():
                    # Returns after the timeout with nothing, so that stop() is seen.
                    for n in self._conn.notifies(timeout=0.5):
                        self._deliver(n.channel, n.payload)
            except Exception as e:
                if self._stop.is_set():
                    break
                attempt = self.health.down(e)
                # Jittered: every replica lost Postgres at the same instant.
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "%s: listening connection lost (%s); reconnect attempt %d in %.1f s",
                    *(self._name, describe(e), attempt, wait),
                )
                log.debug("%s: listening connection lost", self._name, exc_info=e)
                self._close()
                self._stop.wait(wait)
                delay = min(2 * delay, 5.0)
        self._close()
