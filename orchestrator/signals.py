"""Registration, signals and heartbeats from devices (queue ``orchestrator.signals``)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import queries as q
from db.engine import session_scope
from db.queries import orchestrator as oq
from orchestrator import secagg_wire
from orchestrator.accounts import AccountError, BrokerAccounts
from orchestrator.keys import SigningKeys
from orchestrator.outbox import notify_device, send_to_device
from orchestrator.state import ClientJoined, ClientLeft, ClientSignal, Heartbeat, Input, Rejected
from orchestrator.store import StepInput, StepResult, record_and_publish, step_many
from protocol import auth, sealing
from protocol.bus import Delivery
from protocol.limits import (
    REGISTER_REJECTED,
    RegistrationLimits,
    TokenBuckets,
    cap_refusal,
    device_info_refusal,
)
from protocol.messages import (
    ClientState,
    Event,
    MessageError,
    Register,
    Registered,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    Signal,
    parse_message,
    registered_context,
)

# The wire's heartbeat; ``Heartbeat`` is the machine's input made from it.
from protocol.messages import Heartbeat as HeartbeatMsg

# A device's SecAgg+ stage messages: authenticated, de-duplicated and stepped like signals.
StageMessage = SecAggKeys | SecAggShares | SecAggReveal

log = logging.getLogger(__name__)


@dataclass
class Signals:
    sessions: sessionmaker[Session]
    after_commit: Callable[[], None]
    max_message_bytes: int = 1 << 20
    clock: Callable[[], float] = time.time
    # Per-device broker users (orchestrator/accounts.py); None: devices share one user.
    accounts: BrokerAccounts | None = None
    limits: RegistrationLimits = field(default_factory=RegistrationLimits)
    # The orchestrator's signing key, whose public half each registration reply carries.
    keys: SigningKeys | None = None
    # How far a signal's timestamp may be from this clock (protocol/auth.py).
    auth_window_s: float = auth.DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = SigningKeys(self.sessions)
        # Per broker user that published the Register (protocol/limits.py).
        self._buckets = TokenBuckets(self.limits.rate_per_s, self.limits.burst)
        self._throttle_logged: dict[str, float] = {}

    def _public_key(self) -> str:
        """Read before a transaction opens (the first read may write the key: see
        ``SigningKeys``); cached after that."""
        assert self.keys is not None
        return self.keys.public_key

    def handle(self, d: Delivery) -> None:
        try:
            msg = parse_message(d.body, max_bytes=self.max_message_bytes)
        except MessageError as e:
            self._refuse(d, None, None, f"malformed message: {e}")
            return
        if isinstance(msg, Register):
            reason = self._register(msg, d.user_id)
        elif isinstance(msg, Signal | HeartbeatMsg | StageMessage):
            reason = self._signal(msg)
        else:
            reason = f"unexpected message type {msg.type!r} on the signals queue"
            self._refuse(d, msg.run_id, msg.client_id, reason)
            return
        d.settle(reason)
        self.after_commit()

    def handle_many(self, ds: list[Delivery]) -> None:
        """A group commit: every message of ``ds`` in one transaction (each run's machine
        stepped through its messages under one lock), then each settled on its own: acked,
        or dead-lettered with its reason. If the batch raises, nothing of it committed and
        the caller runs the messages one at a time (``handle``), so a message that breaks
        the batch is dealt with alone."""
        reasons = self._batch(ds)
        for d, reason in zip(ds, reasons, strict=True):
            d.settle(reason)
        self.after_commit()

    def _batch(self, ds: list[Delivery]) -> list[str | None]:
        """Each message's refusal reason (None: acknowledge it), committed together."""
        reasons: list[str | None] = [None] * len(ds)
        msgs: dict[int, Register | Signal | HeartbeatMsg | StageMessage] = {}
        self._public_key()
        with session_scope(self.sessions) as s:
            for i, d in enumerate(ds):
                try:
                    msg = parse_message(d.body, max_bytes=self.max_message_bytes)
                except MessageError as e:
                    reasons[i] = f"malformed message: {e}"
                    record_and_publish(s, None, "signal.refused", detail={"reason": reasons[i]})
                    continue
                if isinstance(msg, Register | Signal | HeartbeatMsg | StageMessage):
                    msgs[i] = msg
                else:
                    reasons[i] = f"unexpected message type {msg.type!r} on the signals queue"
                    record_and_publish(
                        s,
                        msg.run_id,
                        "signal.refused",
                        client_id=msg.client_id,
                        detail={"reason": reasons[i]},
                    )
            # Tokens are checked before ids are claimed, as one at a time (``_signal``): a
            # refused message keeps no claim, so a copy of it is refused again with its
            # reason rather than taken for a message already processed.
            _authenticate(s, msgs, reasons, self.clock(), self.auth_window_s)
            # Re-deliveries change nothing (heartbeats are not de-duplicated: see _signal).
            fresh = q.mark_messages_processed(
                s,
                (
                    m.message_id
                    for i, m in msgs.items()
                    if reasons[i] is None and not isinstance(m, HeartbeatMsg)
                ),
            )
            runs: dict[str, list[tuple[int, StepInput]]] = {}
            tokens: dict[int, str] = {}
            known = {
                run_id: q.get_run(s, run_id) is not None
                for run_id in {m.run_id for m in msgs.values() if isinstance(m, Register)}
            }
            joining: dict[str, list[int]] = {}
            registered: dict[str, int] = {}  # per run: committed clients + admitted above
            for i, msg in msgs.items():
                if reasons[i] is not None:
                    continue  # refused above
                if not isinstance(msg, HeartbeatMsg) and msg.message_id not in fresh:
                    continue  # processed before: acknowledged again, nothing done
                if isinstance(msg, Register):
                    admitted, reasons[i] = self._screen(
                        s, msg, known[msg.run_id], ds[i].user_id, registered
                    )
                    if admitted:
                        tokens[i] = secrets.token_urlsafe(32)
                        joining.setdefault(msg.run_id, []).append(i)
                    continue
                runs.setdefault(msg.run_id, []).append(
                    (i, StepInput(_machine_input(msg), msg.message_id))
                )
            # New clients in one INSERT a run; they join before the run's other messages
            # (none of which can be theirs: a device learns its id from the reply).
            for run_id, idx in joining.items():
                regs = [msgs[i] for i in idx]
                cids = q.register_clients(
                    s,
                    run_id,
                    [
                        (m.display_name, q.hash_token(tokens[i]), dict(m.device_info))
                        for i, m in zip(idx, regs, strict=True)
                        if isinstance(m, Register)
                    ],
                )
                joins = [
                    (i, StepInput(ClientJoined(cid), msgs[i].message_id))
                    for i, cid in zip(idx, cids, strict=True)
                ]
                runs[run_id] = joins + runs.get(run_id, [])
            now = self.clock()
            # Runs locked in one order (their ids) in every process: two replicas' batches
            # that share two runs would otherwise deadlock, each holding one.
            for run_id, items in sorted(runs.items()):
                results = step_many(s, run_id, [inp for _, inp in items], now)
                outcomes: list[StepResult | None] = (
                    list(results) if results is not None else [None] * len(items)
                )
                for (i, inp), res in zip(items, outcomes, strict=True):
                    reasons[i] = self._settled(s, msgs[i], inp, res, tokens.get(i))
        return reasons

    def _settled(
        self,
        s: Session,
        msg: Register | Signal | HeartbeatMsg | StageMessage,
        inp: StepInput,
        res: StepResult | None,
        token: str | None,
    ) -> str | None:
        """What a batch's step of ``msg`` leaves to do: its reason if refused, else the
        registration's reply (and broker user)."""
        if res is None:
            return f"unknown run {msg.run_id}"
        if isinstance(res.refusal, Rejected):
            if res.refusal.rejoin and isinstance(msg, HeartbeatMsg):
                _ask_to_rejoin(s, msg, res.refusal.reason)
            return res.refusal.reason
        if isinstance(msg, Register):
            assert token is not None and isinstance(inp.event, ClientJoined)
            self._reply(s, msg, inp.event.client_id, token)
        return None

    def _reply(self, s: Session, msg: Register, cid: str, token: str) -> None:
        broker_user = None
        if self.accounts is not None and msg.broker_account:
            # Made before the reply is queued: the device connects as it at once. If this
            # transaction then fails, the user is orphaned with a token no one knows.
            broker_user = self.accounts.provision(cid, token)
        # Sealed to the device's registration key: the reply crosses the bus, where with a
        # shared broker user anyone may bind a queue and read it.
        sealed = sealing.seal(
            token, msg.reply_pub, registered_context(msg.run_id, msg.reply_key, cid)
        )
        reply = Registered(
            run_id=msg.run_id,
            client_id=cid,
            reply_key=msg.reply_key,
            sealed_token=sealed,
            broker_user=broker_user,
            signing_key=self._public_key(),
        )
        send_to_device(s, msg.run_id, msg.reply_key, reply.to_json(), reply.message_id)

    def _screen(
        self,
        s: Session,
        msg: Register,
        known: bool,
        source: str | None,
        registered: dict[str, int],
    ) -> tuple[bool, str | None]:
        """``_admit`` for a registration of a run that may not exist."""
        if known:
            return self._admit(s, msg, source, registered)
        reason = f"unknown run {msg.run_id}"
        record_and_publish(
            s,
            None,
            "register.rejected",
            message_id=msg.message_id,
            detail={"reason": reason, "run_id": msg.run_id},
        )
        return False, reason

    def _admit(
        self, s: Session, msg: Register, source: str | None, registered: dict[str, int]
    ) -> tuple[bool, str | None]:
        """Whether registration ``msg`` (of a known run) may go on: its source's rate, the
        size of its ``device_info``, the run's cap (protocol/limits.py). If not, the
        device is answered (``register.rejected`` on its reply queue) and the second value
        is the message's dead-letter reason: None (acknowledged) for a rate or the cap,
        which well-formed messages meet, and whose floods must not fill ``dead-letters``.
        ``registered``: the run's clients counted so far in this transaction."""
        lim = self.limits
        who = source or "the shared broker user"
        wait = self._buckets.take(source or "")
        if wait > 0:
            self._log_throttled(who)
            reason = f"too many registrations from {who}; retry in {wait:.1f} s"
            self._answer_refusal(s, msg, reason, wait)
            return False, None
        too_big = device_info_refusal(msg.device_info, lim.max_device_info_bytes)
        if too_big is not None:
            self._answer_refusal(s, msg, too_big, None)
            return False, too_big
        count = registered.get(msg.run_id)
        if count is None:
            count = q.count_run_clients(s, msg.run_id)
        full = cap_refusal(msg.run_id, count, lim.max_clients_per_run)
        if full is not None:
            self._answer_refusal(s, msg, full, lim.cap_retry_after_s)
            return False, None
        registered[msg.run_id] = count + 1
        return True, None

    def _answer_refusal(
        self, s: Session, msg: Register, reason: str, retry_after_s: float | None
    ) -> None:
        detail: dict[str, Any] = {"reason": reason, "run_id": msg.run_id}
        if retry_after_s is not None:
            detail["retry_after_s"] = round(retry_after_s, 3)
        record_and_publish(
            s, msg.run_id, REGISTER_REJECTED, message_id=msg.message_id, detail=dict(detail)
        )
        answer = Event(
            run_id=msg.run_id,
            kind=REGISTER_REJECTED,
            correlation_id=msg.message_id,
            detail=detail,
        )
        send_to_device(s, msg.run_id, msg.reply_key, answer.to_json(), answer.message_id)

    def _log_throttled(self, who: str) -> None:
        """One warning a minute per source: a flood of refusals must not flood the log."""
        now = time.monotonic()
        if now - self._throttle_logged.get(who, -1e9) < 60:
            return
        if len(self._throttle_logged) > 1000:
            self._throttle_logged.clear()
        self._throttle_logged[who] = now
        log.warning("registrations from %s over the rate limit; refusing them", who)

    def _register(self, msg: Register, source: str | None = None) -> str | None:
        try:
            return self._enroll(msg, source)
        except AccountError as e:
            # Nothing of the registration committed; the device times out and registers
            # again (with a new reply key) once the broker's management API answers.
            reason = f"no broker account could be made: {e}"
            log.warning("registration for run %s refused: %s", msg.run_id, reason)
            with session_scope(self.sessions) as s:
                record_and_publish(
                    s,
                    msg.run_id,
                    "register.rejected",
                    message_id=msg.message_id,
                    detail={"reason": reason, "run_id": msg.run_id},
                )
            return reason

    def _enroll(self, msg: Register, source: str | None) -> str | None:
        token = secrets.token_urlsafe(32)
        self._public_key()
        with session_scope(self.sessions) as s:
            if not q.mark_message_processed(s, msg.message_id):
                return None
            if oq.lock_run(s, msg.run_id) is None:
                record_and_publish(
                    s,
                    None,
                    "register.rejected",
                    message_id=msg.message_id,
                    detail={"reason": f"unknown run {msg.run_id}", "run_id": msg.run_id},
                )
                return f"unknown run {msg.run_id}"
            admitted, refusal = self._admit(s, msg, source, {})
            if not admitted:
                return refusal
            cid = q.register_client(
                s, msg.run_id, msg.display_name, q.hash_token(token), dict(msg.device_info)
            )
            joined = StepInput(ClientJoined(cid), msg.message_id)
            res = step_many(s, msg.run_id, [joined], self.clock())
            return self._settled(s, msg, joined, None if res is None else res[0], token)

    def _signal(self, msg: Signal | HeartbeatMsg | StageMessage) -> str | None:
        machine_input = _machine_input(msg)
        with session_scope(self.sessions) as s:
            refused: list[str | None] = [None]
            _authenticate(s, {0: msg}, refused, self.clock(), self.auth_window_s)
            if refused[0] is not None:
                return refused[0]
            # Heartbeats are not de-duplicated: repeating one is harmless and they are many.
            if not isinstance(msg, HeartbeatMsg) and not q.mark_message_processed(
                s, msg.message_id
            ):
                return None
            inp = StepInput(machine_input, msg.message_id)
            res = step_many(s, msg.run_id, [inp], self.clock())
            return self._settled(s, msg, inp, None if res is None else res[0], None)

    def _refuse(self, d: Delivery, run_id: str | None, client_id: str | None, reason: str) -> None:
        try:
            with session_scope(self.sessions) as s:
                record_and_publish(
                    s, run_id, "signal.refused", client_id=client_id, detail={"reason": reason}
                )
        finally:
            d.reject(reason)
        self.after_commit()


def _authenticate(
    s: Session,
    msgs: dict[int, Register | Signal | HeartbeatMsg | StageMessage],
    reasons: list[str | None],
    now: float,
    window_s: float,
) -> None:
    """Refuse (``reasons``, an ``auth.rejected`` record) every message of ``msgs`` but a
    registration whose client is unknown, of another run, whose MAC is missing or wrong
    (protocol/auth.py), or whose timestamp is outside the window."""
    clients = q.get_clients(s, (m.client_id for m in msgs.values() if not isinstance(m, Register)))
    for i, msg in msgs.items():
        if isinstance(msg, Register):
            continue
        client = clients.get(msg.client_id)
        key = None
        if client is not None and client.run_id == msg.run_id:
            # The MAC key is the token's SHA-256, which is what the client row stores.
            key = bytes.fromhex(client.token_hash)
        reason = auth.check(msg, key, now=now, window_s=window_s)
        if reason is None:
            continue
        reasons[i] = reason
        record_and_publish(
            s,
            msg.run_id,
            "auth.rejected",
            client_id=msg.client_id,
            message_id=msg.message_id,
            detail={"reason": reasons[i], "type": msg.type},
        )


REJOIN = "client.rejoin"


def _machine_input(msg: Signal | HeartbeatMsg | StageMessage) -> Input:
    if isinstance(msg, StageMessage):
        return secagg_wire.machine_input(msg)
    if isinstance(msg, HeartbeatMsg):
        return Heartbeat(msg.client_id)
    if msg.state is ClientState.OFFLINE:
        return ClientLeft(msg.client_id)
    if msg.state is ClientState.JOIN:
        return ClientJoined(msg.client_id)
    return ClientSignal(msg.client_id, msg.state)


def _ask_to_rejoin(s: Session, msg: HeartbeatMsg, reason: str) -> None:
    """A device heartbeating while written off (heartbeat timeout, e.g. across a broker
    restart its own connection survived) does not know it: tell it on its queue, and it
    signals join + ready again."""
    ev = Event(
        run_id=msg.run_id,
        client_id=msg.client_id,
        kind=REJOIN,
        correlation_id=msg.message_id,
        detail={"reason": reason},
    )
    notify_device(s, ev)
