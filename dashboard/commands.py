"""Operator commands from the dashboard: published on ``fedmq.control`` like
``fedmq command ...``, then confirmed by the orchestrator's ``command.result`` event, which
names the command's message id (read from the events table)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries import dashboard as dq
from protocol import auth, topology
from protocol.bus import Bus
from protocol.messages import Command, CommandAction


@dataclass(frozen=True)
class Outcome:
    action: str
    message_id: str
    accepted: bool | None  # None: no answer within the timeout
    reason: str | None


def send(
    bus: Bus,
    token: str,
    run_id: str,
    action: CommandAction,
    *,
    rounds: int | None = None,
    target_client: str | None = None,
) -> str:
    """Publish one command, signed under ``token`` (never carrying it: the control exchange
    may have other readers); returns its message id."""
    cmd = auth.sign(
        Command(run_id=run_id, action=action, rounds=rounds, target_client=target_client), token
    )
    # Not declared here (the orchestrator's queues are its own); the publish is mandatory, so
    # with no orchestrator queue yet it fails with ``Unroutable`` instead of vanishing.
    bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())
    return cmd.message_id


def wait_outcome(
    sessions: sessionmaker[Session],
    action: CommandAction,
    message_id: str,
    timeout_s: float,
    poll_s: float = 0.1,
) -> Outcome:
    """The orchestrator's answer to ``message_id``, polled from the events table."""
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(sessions) as s:
            event = dq.command_result(s, message_id)
            if event is not None:
                reason = event.detail.get("reason")
                return Outcome(
                    action.value,
                    message_id,
                    bool(event.detail.get("accepted")),
                    None if reason is None else str(reason),
                )
        if time.monotonic() >= deadline:
            return Outcome(action.value, message_id, None, None)
        time.sleep(poll_s)
