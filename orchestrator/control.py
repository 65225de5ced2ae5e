"""Operator commands (queue ``orchestrator.control``): checked, de-duplicated, stepped.

The result is an ``Event`` of kind ``command.result`` whose ``correlation_id`` is the
command's message id, stored in ``events`` and published on ``fedmq.events``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db import queries as q
from db.engine import session_scope
from orchestrator.counter import count
from orchestrator.outbox import revoke_account
from orchestrator.state import Ignored, command_event
from orchestrator.store import StepInput, record_and_publish
from protocol import auth
from protocol.bus import Delivery
from protocol.messages import Command, CommandAction, MessageError, parse_as

RESULT = "command.result"


NO_OPERATOR = "this orchestrator has no operator token (FEDMQ_OPERATOR_TOKEN): commands are refused"


@dataclass
class Control:
    sessions: sessionmaker[Session]
    # None: no operator was configured, and every command is refused (never a known default).
    operator_token: str | None
    after_commit: Callable[[], None]
    clock: Callable[[], float] = time.time
    auth_window_s: float = auth.DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        self._key = None if not self.operator_token else auth.mac_key(self.operator_token)

    def handle(self, d: Delivery) -> None:
        try:
            cmd = parse_as(d.body, Command)
        except MessageError as e:
            self._done(d, None, None, f"malformed command: {e}")
            return
        # Before the id is claimed: a refused command can be sent again, properly signed.
        refused = (
            NO_OPERATOR
            if self._key is None
            else auth.check(cmd, self._key, now=self.clock(), window_s=self.auth_window_s)
        )
        if refused is not None:
            self._done(d, cmd, None, refused)
            return
        with session_scope(self.sessions) as s:
            # A re-delivered command must not act twice (a second autorun would reset N).
            if not q.mark_message_processed(s, cmd.message_id):
                d.ack()
                return
            event = command_event(cmd.action, cmd.rounds, cmd.target_client)
            # Stored updates are counted first: closing a round must not pass them by.
            step = StepInput(event, cmd.message_id, cmd.message_id)
            results = count(s, cmd.run_id, self.clock(), extra=[step]).results
            res = None if results is None else results[0]
            if res is None:
                reason: str | None = f"unknown run {cmd.run_id}"
                ok = False
            else:
                refusal = res.refusal
                ok = refusal is None or isinstance(refusal, Ignored)
                reason = None if refusal is None else refusal.reason
                if refusal is None and cmd.action is CommandAction.KICK and cmd.target_client:
                    revoke_account(s, cmd.run_id, cmd.target_client)
            record_and_publish(
                s,
                cmd.run_id if res is not None else None,
                RESULT,
                message_id=cmd.message_id,
                correlation_id=cmd.message_id,
                detail={"action": cmd.action.value, "accepted": ok, "reason": reason},
            )
        d.ack()
        self.after_commit()

    def _done(self, d: Delivery, cmd: Command | None, _: object, reason: str) -> None:
        """A command that is not even parsed or authorised: recorded and dead-lettered."""
        try:
            with session_scope(self.sessions) as s:
                record_and_publish(
                    s,
                    cmd.run_id if cmd else None,
                    RESULT,
                    message_id=cmd.message_id if cmd else None,
                    correlation_id=cmd.message_id if cmd else None,
                    detail={
                        "action": cmd.action.value if cmd else None,
                        "accepted": False,
                        "reason": reason,
                    },
                )
        finally:
            d.reject(reason)
        self.after_commit()
