"""The consumer of ``dead-letters`` (issue 17, finding 6): it records what it drops.

Before, nothing read the queue: 280 whole messages (update chunks of up to 4 MiB among them)
sat in it after an attack, and it would have grown for as long as anyone sent garbage. Now
each replica consumes it and, per message, writes one ``dead_letter.dropped`` event (no run:
the message may name a run that does not exist) with what a person needs to find the cause:
the reason, the original exchange, routing key and queue, the message id, the publishing
broker user and the size. Never the body, and never the headers as such: an update's
headers carry its envelope, token included. Those events fall under the retention of
events that name no run (orchestrator/retention.py), so they are bounded too. The queue's
own bounds (protocol/topology.py: length, bytes, TTL) hold while no orchestrator runs.

A failure to record (the database away) still drops the messages, with a log line saying
how many and why: a dead letter is already something that was refused, and sending it
back to ``dead-letters`` (the bus's policy for a handler that fails) would loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.models import Event, utcnow
from protocol.bus import Delivery
from protocol.bus.base import (
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
)

log = logging.getLogger(__name__)

DROPPED = "dead_letter.dropped"
_MAX_TEXT = 200


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)[:_MAX_TEXT]


def describe(d: Delivery) -> dict[str, Any]:
    """What is kept of a dead letter: where it came from and why, never its content."""
    h = d.headers
    reason = h.get(REASON_HEADER)
    if reason is None:
        # Dead-lettered by the broker itself (a nack without requeue, a TTL, a length limit).
        reason = f"broker: {_text(h.get('x-first-death-reason')) or 'unknown'}"
    return {
        "reason": _text(reason),
        "exchange": _text(h.get(ORIGINAL_EXCHANGE_HEADER) or d.exchange),
        "routing_key": _text(h.get(ORIGINAL_ROUTING_KEY_HEADER) or d.routing_key),
        "queue": _text(h.get(ORIGINAL_QUEUE_HEADER) or h.get("x-first-death-queue")),
        "bytes": len(d.body),
        "user": _text(d.user_id),
    }


class DeadLetters:
    def __init__(
        self, sessions: sessionmaker[Session], clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.dropped = 0

    def handle_many(self, ds: list[Delivery]) -> None:
        now = self.clock()
        details = [describe(d) for d in ds]
        rows: list[dict[str, Any]] = [
            {
                "run_id": None,
                "kind": DROPPED,
                "ts": now,
                "client_id": None,
                "round": None,
                "message_id": (d.message_id or "")[:100] or None,
                "detail": detail,
            }
            for d, detail in zip(ds, details, strict=True)
        ]
        reasons = Counter(str(x["reason"])[:80] for x in details)
        try:
            with session_scope(self.sessions) as s:
                s.execute(insert(cast(Table, Event.__table__)), rows)
        except Exception as e:
            log.warning(
                "dropping %d dead letters unrecorded (%r); reasons: %s",
                len(ds),
                e,
                dict(reasons.most_common(5)),
            )
        else:
            log.info("dropped %d dead letters; reasons: %s", len(ds), dict(reasons.most_common(5)))
        for d in ds:
            if not d.settled:
                d.ack()
        self.dropped += len(ds)

    def handle(self, d: Delivery) -> None:
        self.handle_many([d])
