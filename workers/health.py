"""The worker's heartbeat row (``service_health``): is its consumer connected to the broker?

Celery restarts its consumer's bootsteps around a lost connection (``stop`` when it is lost,
``start`` once it is back), so a step of our own at the end of the consumer's blueprint sees
both; a ``HealthReporter`` thread in the worker's main process writes what it saw. Celery
itself keeps reconnecting for ever (``broker_connection_max_retries=None``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from db.engine import make_engine, make_sessionmaker
from db.health import HealthReporter
from protocol.bus.health import LinkHealth, summary

log = logging.getLogger(__name__)

BROKER = LinkHealth("worker consumer")
_lock = threading.Lock()
_reporter: HealthReporter | None = None


def _probe() -> dict[str, Any]:
    return summary([BROKER.snapshot()])


def _start_reporter(hostname: str, database_url: str, period_s: float = 5.0) -> None:
    global _reporter
    with _lock:
        if _reporter is not None:
            return
        sessions = make_sessionmaker(make_engine(database_url))
        name = f"worker {hostname}"
        _reporter = HealthReporter(sessions, name, "worker", _probe, period_s=period_s).start()


class BrokerHealth(bootsteps.StartStopStep):
    """Last of the consumer's steps: started once the worker consumes its queues."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c: Any) -> None:
        from workers.app import current_config

        if BROKER.attempts_in_a_row:
            log.warning("consuming again after a lost broker connection")
        BROKER.up()
        try:
            _start_reporter(str(c.hostname), current_config().database_url)
        except Exception as e:  # the row is for people; the worker works without it
            log.warning("no health row: %s", e)
        if _reporter is not None:
            _reporter.write_now()

    def stop(self, c: Any) -> None:
        # Called when the connection is lost (Celery restarts the consumer's steps) and on
        # the way to a shutdown; ``shutdown`` follows in the second case.
        BROKER.down("connection to the broker lost")
        if _reporter is not None:
            _reporter.write_now()

    def shutdown(self, c: Any) -> None:
        BROKER.stopped()
        if _reporter is not None:
            _reporter.stop()
