"""Sending Celery tasks by name and following them; the orchestrator never imports workers.

``TaskRunner`` is what the service needs; ``CeleryTaskRunner`` is the full-mode one (a bare
Celery client on the broker and the database result backend). The embedded mode's eager
runner lives in the composition root (``fedmq.wiring``), which may import workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from kombu.exceptions import OperationalError

from db.engine import normalize_url
from protocol.bus import ConnectionLost
from protocol.bus.health import describe

# Raised by the workers for what a retry cannot fix (workers.tasks.common); matched by name.
FINAL_ERRORS = frozenset({"AggregationError", "EvaluationError"})


@dataclass(frozen=True)
class TaskStatus:
    """``state`` is "pending", "success" or "failure"."""

    state: str
    result: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = True


class TaskRunner(Protocol):
    def send(self, name: str, args: list[Any], task_id: str, queue: str) -> None: ...

    def poll(self, task_id: str) -> TaskStatus: ...


class BrokerUnavailable(ConnectionLost):
    """A task could not be sent: the broker is away. A ``BusError``, so the outbox keeps
    the item and sends it again on the next tick (any other error drops an item)."""


def result_backend_url(database_url: str) -> str:
    """``db+<url>`` with the driver the workers use (``postgresql+psycopg``)."""
    return "db+" + normalize_url(database_url).render_as_string(hide_password=False)


class CeleryTaskRunner:
    def __init__(self, broker_url: str, result_backend: str) -> None:
        self.app = Celery("fedmq-orchestrator", set_as_current=False)
        self.app.conf.update(
            broker_url=broker_url,
            result_backend=result_backend,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"confirm_publish": True},
            database_short_lived_sessions=True,
            task_publish_retry=True,
        )

    def send(self, name: str, args: list[Any], task_id: str, queue: str) -> None:
        try:
            self.app.send_task(name, args=args, task_id=task_id, queue=queue)
        except (OperationalError, OSError) as e:
            # Before: dropped as a bad item, so a round closed while the broker was away
            # waited out task_timeout_s (10 min) before its aggregation was sent again.
            raise BrokerUnavailable(f"sending {name} ({task_id}): {describe(e)}") from None

    def poll(self, task_id: str) -> TaskStatus:
        res = self.app.AsyncResult(task_id)
        state = res.state
        if state == "SUCCESS":
            value = res.result
            return TaskStatus("success", value if isinstance(value, dict) else {})
        if state in ("FAILURE", "REVOKED"):
            return failure_status(res.result)
        return TaskStatus("pending")

    def close(self) -> None:
        self.app.close()


def failure_status(exc: Any) -> TaskStatus:
    name = type(exc).__name__ if isinstance(exc, BaseException) else str(exc)
    return TaskStatus("failure", error=f"{name}: {exc}", retryable=name not in FINAL_ERRORS)
