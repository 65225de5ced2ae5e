"""The gateway's side of the bus: each HTTP action becomes the message an AMQP device (or
an operator's ``fedmq command``) sends, byte for byte the same envelopes and chunk headers
(docs/architecture.md, "Wire conventions (devices)"). So the orchestrator cannot tell an
HTTP device from an AMQP one, and both share rounds.

Each HTTP client also gets the durable ``device.<client_id>`` queue an AMQP device
declares; ``messages`` pulls it for the client (its round announcements and notices).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.errors import GatewayError
from protocol import auth, chunking, enveloped, registration, sealing, topology
from protocol.bus import Bus, BusError
from protocol.limits import retry_after_header
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Event,
    Heartbeat,
    MessageError,
    Register,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    Signal,
    UpdateMeta,
    parse_message,
)
from protocol.signing import SIGNATURE_HEADER

log = logging.getLogger(__name__)

MAX_MESSAGES = 32  # per answer of ``messages``


def _refusal(ev: Event) -> GatewayError:
    """The orchestrator's ``register.rejected`` answer as the HTTP answer: 429 with
    Retry-After when waiting helps (a rate, the run's cap), else 422."""
    reason = str(ev.detail.get("reason") or "registration refused")
    retry = ev.detail.get("retry_after_s")
    if isinstance(retry, int | float) and not isinstance(retry, bool):
        return GatewayError(429, reason, {"Retry-After": retry_after_header(float(retry))})
    return GatewayError(422, reason)


def _bus_call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BusError as e:
        raise GatewayError(503, f"{what}: the message bus is unavailable ({e})") from None


class Bridge:
    def __init__(
        self,
        bus: Bus,
        chunk_size: int,
        register_timeout_s: float,
        *,
        queue_expires_s: float | None = topology.DEVICE_QUEUE_EXPIRES_S,
    ) -> None:
        # Nothing of the orchestrator's side is declared here: its queues are its own (and the
        # broker definitions'), and a user allowed to declare them may delete them too.
        # Publishes are mandatory, so one sent before any orchestrator declared its queues
        # is refused (503), never dropped.
        self.bus, self.chunk_size, self.register_timeout_s = bus, chunk_size, register_timeout_s
        self.queue_expires_s = queue_expires_s

    def register(
        self,
        run_id: str,
        display_name: str,
        device_info: dict[str, Any],
        signing_key: str | None = None,
    ) -> tuple[str, str, str]:
        """The reply-key dance of an AMQP device; returns (client id, token, the
        orchestrator's signing key). A reply not signed by ``signing_key`` (the one in the
        database, when known) is ignored, as an AMQP device ignores one not signed by the
        key it pinned: something else on the bus may have answered first. The
        orchestrator's refusal (its rate or the run's cap) is a 429 with Retry-After."""
        reply_key = f"gw-{uuid.uuid4().hex}"
        private, public = sealing.new_keypair()
        reply_queue = _bus_call("register", lambda: topology.declare_reply(self.bus, reply_key))
        try:
            reg = Register(
                run_id=run_id,
                display_name=display_name,
                reply_key=reply_key,
                device_info=device_info,
                reply_pub=public,
            )
            key = topology.signal_routing_key(reply_key)
            _bus_call(
                "register", lambda: self.bus.publish(topology.SIGNALS_EXCHANGE, key, reg.to_json())
            )
            deadline = time.monotonic() + self.register_timeout_s
            while time.monotonic() < deadline:
                d = _bus_call("register", lambda: self.bus.get(reply_queue, timeout=0.2))
                if d is None:
                    continue
                d.ack()
                try:
                    msg = parse_message(d.body)
                except MessageError:
                    continue
                got = registration.answer(
                    msg,
                    d.body,
                    d.headers,
                    run_id=run_id,
                    reply_key=reply_key,
                    register_id=reg.message_id,
                    private_key=private,
                    expected_key=signing_key,
                )
                if isinstance(got, Event):
                    raise _refusal(got)
                if got is not None:
                    self.attach(run_id, got.registered.client_id)
                    return got.registered.client_id, got.token, got.signing_key
            raise GatewayError(
                504,
                f"the orchestrator did not answer the registration within "
                f"{self.register_timeout_s:.0f} s",
            )
        finally:
            with contextlib.suppress(BusError):
                self.bus.delete_queue(reply_queue)

    def attach(self, run_id: str, client_id: str) -> None:
        """Declare the client's device queue (idempotent), as an AMQP device does."""
        _bus_call(
            "attach",
            lambda: topology.declare_device(
                self.bus, client_id, run_id, expires_s=self.queue_expires_s
            ),
        )

    def signal(self, run_id: str, client_id: str, token: str, state: str) -> str:
        """``token`` came over the device's own HTTP link; what goes on the bus carries only
        a MAC under it (protocol/auth.py)."""
        msg: Signal | Heartbeat
        if state == "heartbeat":
            msg = auth.sign(Heartbeat(run_id=run_id, client_id=client_id), token)
        else:
            if state in (ClientState.JOIN, ClientState.READY):
                self.attach(run_id, client_id)  # a rejoin after leaving needs its queue back
            msg = auth.sign(
                Signal(run_id=run_id, client_id=client_id, state=ClientState(state)), token
            )
        key = topology.signal_routing_key(client_id)
        _bus_call("signal", lambda: self.bus.publish(topology.SIGNALS_EXCHANGE, key, msg.to_json()))
        return msg.message_id

    def stage(self, run_id: str, client_id: str, token: str, body: dict[str, Any]) -> str:
        """A SecAgg+ stage message of the client (keys, share boxes, revealed shares), as
        an AMQP device sends it: validated as the orchestrator will, with a MAC under the
        token in place of the token. The boxes are sealed for their recipients: the gateway
        relays what it cannot read."""
        try:
            msg = parse_message(json.dumps(body).encode())
        except (MessageError, TypeError, ValueError) as e:
            raise GatewayError(422, f"invalid SecAgg+ message: {e}") from None
        if not isinstance(msg, SecAggKeys | SecAggShares | SecAggReveal):
            raise GatewayError(422, f"not a device's SecAgg+ message: {msg.type}")
        if msg.run_id != run_id or msg.client_id != client_id:
            raise GatewayError(403, "a SecAgg+ message must be the caller's own, in its run")
        signed = auth.sign(msg, token)
        key = topology.signal_routing_key(client_id)
        _bus_call(
            "secagg", lambda: self.bus.publish(topology.SIGNALS_EXCHANGE, key, signed.to_json())
        )
        return signed.message_id

    def leave(self, run_id: str, client_id: str, token: str) -> str:
        message_id = self.signal(run_id, client_id, token, ClientState.OFFLINE.value)
        _bus_call("leave", lambda: self.bus.delete_queue(topology.device_queue(client_id)))
        return message_id

    def command(self, run_id: str, operator_token: str, action: CommandAction, **kw: Any) -> str:
        cmd = auth.sign(Command(run_id=run_id, action=action, **kw), operator_token)
        _bus_call(
            "command",
            lambda: self.bus.publish(
                topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json()
            ),
        )
        return cmd.message_id

    def publish_update(self, meta: UpdateMeta, blob: bytes) -> None:
        """The blob as chunks to ``fedmq.updates``, ``UpdateMeta`` in every chunk's headers."""
        envelope = meta.model_dump_json()
        key = topology.update_routing_key(meta.run_id, int(meta.round or 0), meta.client_id)

        def send() -> None:
            for chunk in chunking.iter_chunks(blob, self.chunk_size):
                headers = enveloped.headers(chunk, envelope)
                self.bus.publish(topology.UPDATES_EXCHANGE, key, chunk.data, headers=headers)

        _bus_call("update", send)

    def messages(
        self, run_id: str, client_id: str, wait_s: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, str | None]]]:
        # Reading the queue is what keeps it from expiring (x-expires counts basic.get).
        """Up to ``MAX_MESSAGES`` JSON envelopes from the client's queue, waiting up to
        ``wait_s`` for the first, parsed and as signed: ``{"body": the exact JSON text,
        "signature": x-fedmq-signature or None}``, for the device to verify end to end (the
        gateway relays, it does not vouch). Model chunks are dropped: HTTP clients fetch
        models whole."""
        queue = topology.device_queue(client_id)
        out: list[dict[str, Any]] = []
        signed: list[dict[str, str | None]] = []
        deadline = time.monotonic() + wait_s
        while len(out) < MAX_MESSAGES:
            left = max(0.0, deadline - time.monotonic()) if not out else 0.0
            try:
                d = self.bus.get(queue, timeout=left)
            except BusError:
                self.attach(run_id, client_id)  # deleted by a leave, or lost with the broker
                d = _bus_call("messages", partial(self.bus.get, queue, timeout=left))
            if d is None:
                break
            d.ack()
            if chunking.is_chunk(d.headers):
                continue
            try:
                parse_message(d.body)
                out.append(json.loads(d.body))
                text = d.body.decode()  # JSON of our own is UTF-8: exact bytes come back
            except (MessageError, ValueError) as e:
                log.warning("dropping an unreadable message for %s: %s", client_id, e)
                continue
            sig = d.headers.get(SIGNATURE_HEADER)
            signed.append({"body": text, "signature": sig if isinstance(sig, str) else None})
        return out, signed
