"""The device's side of docs/architecture.md "Wire conventions (devices)", as plain functions.

Stateless helpers on a ``Bus``: register (the reply-key dance), signals and heartbeats, the
update's ``UpdateMeta`` and its chunks, and whether an announcement asks this client to
train. ``FederatedClient`` strings them together; the reference is
tests/integration/lightclient.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.local import LocalUpdate, finite_metrics
from protocol import auth, chunking, enveloped, registration, sealing, topology
from protocol.bus import Bus, BusError
from protocol.codec import Encoding
from protocol.messages import (
    ClientState,
    Envelope,
    Event,
    Heartbeat,
    MessageError,
    Register,
    RoundAnnouncement,
    Signal,
    UpdateMeta,
    parse_message,
)

log = logging.getLogger(__name__)


class RegistrationRefused(BusError):
    """The orchestrator refused the registration (a rate, the run's cap, an oversized
    ``device_info``); ``retry_after_s`` says how long to wait first, None: do not retry
    as is."""

    def __init__(self, reason: str, retry_after_s: float | None) -> None:
        super().__init__(f"registration refused: {reason}")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Identity:
    run_id: str
    client_id: str
    token: str
    broker_user: str | None = None  # the device's own broker user (password: the token)
    # The orchestrator's Ed25519 public key, pinned at registration (protocol/signing.py):
    # what arrives on the device's queue without its signature is dropped.
    signing_key: str | None = None


@dataclass(frozen=True)
class SentUpdate:
    round: int
    attempt: int
    base_version: int
    message_id: str  # the UpdateMeta's: notices name it as their correlation_id
    blob_sha256: str
    blob_bytes: int
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def register(
    bus: Bus,
    run_id: str,
    display_name: str,
    *,
    device_info: dict[str, Any] | None = None,
    broker_account: bool = False,
    timeout_s: float = 30.0,
    poll_s: float = 0.1,
    stopping: Callable[[], bool] = lambda: False,
    expected_key: str | None = None,
) -> Identity | None:
    """Register once: a reply queue ``device.<reply_key>``, ``Register`` to ``fedmq.signals``
    (asking for a broker user of its own with ``broker_account``), ``Registered`` back, and
    the reply queue deleted. The caller then declares ``device.<client_id>``, as its own
    broker user if it got one (``BusTransport``). None if ``stopping()`` turned true first;
    ``TimeoutError`` after ``timeout_s`` without an answer.

    The reply must be signed by the key it names, and that key must be ``expected_key``
    when the device already pinned one (``protocol.registration``); a reply that is not is
    logged and ignored, and the wait goes on for the real one."""
    reply_key = f"r{uuid.uuid4().hex[:16]}"
    # The token comes back sealed to this key pair's public half: the answer crosses a bus
    # that others may read (protocol/sealing.py).
    private, public = sealing.new_keypair()
    reply_queue = topology.declare_reply(bus, reply_key)
    try:
        reg = Register(
            run_id=run_id,
            display_name=display_name,
            reply_key=reply_key,
            device_info=dict(device_info or {}),
            broker_account=broker_account,
            reply_pub=public,
        )
        bus.publish(
            topology.SIGNALS_EXCHANGE, topology.signal_routing_key(reply_key), reg.to_json()
        )
        deadline = time.monotonic() + timeout_s
        while not stopping():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Registered within {timeout_s}s (is run {run_id} known?)")
            d = bus.get(reply_queue, timeout=poll_s)
            if d is None:
                continue
            d.ack()
            try:
                msg = parse_message(d.body)
            except MessageError:
                continue  # not for us to act on; the next message may be the answer
            got = registration.answer(
                msg,
                d.body,
                d.headers,
                run_id=run_id,
                reply_key=reply_key,
                register_id=reg.message_id,
                private_key=private,
                expected_key=expected_key,
            )
            if isinstance(got, Event):
                retry = got.detail.get("retry_after_s")
                raise RegistrationRefused(
                    str(got.detail.get("reason")),
                    float(retry) if isinstance(retry, int | float) else None,
                )
            if got is not None:
                reply = got.registered
                return Identity(
                    run_id, reply.client_id, got.token, reply.broker_user, got.signing_key
                )
        return None
    finally:
        # A leftover reply queue is harmless; the next attempt uses a new key.
        with contextlib.suppress(BusError):
            bus.delete_queue(reply_queue)


def send_signal(bus: Bus, ident: Identity, state: ClientState) -> None:
    # Signed, not carrying the token: the signals exchange may have other readers.
    sig = auth.sign(
        Signal(run_id=ident.run_id, client_id=ident.client_id, state=state), ident.token
    )
    key = topology.signal_routing_key(ident.client_id)
    bus.publish(topology.SIGNALS_EXCHANGE, key, sig.to_json())


def send_stage(bus: Bus, ident: Identity, msg: Envelope) -> None:
    """A SecAgg+ stage message on the signals exchange, with its MAC (like a signal)."""
    signed = auth.sign(msg, ident.token)
    bus.publish(
        topology.SIGNALS_EXCHANGE, topology.signal_routing_key(ident.client_id), signed.to_json()
    )


def send_heartbeat(bus: Bus, ident: Identity) -> None:
    hb = auth.sign(Heartbeat(run_id=ident.run_id, client_id=ident.client_id), ident.token)
    bus.publish(
        topology.SIGNALS_EXCHANGE, topology.signal_routing_key(ident.client_id), hb.to_json()
    )


def attempt_for(ann: RoundAnnouncement, client_id: str) -> int | None:
    """The attempt this announcement asks ``client_id`` to train in; None when it is not
    selected, or carried (its update from an earlier attempt already counts)."""
    if client_id not in ann.selected or client_id in ann.carried:
        return None
    return ann.attempt


def update_meta(ident: Identity, upd: LocalUpdate) -> UpdateMeta:
    """The update's envelope, signed under the device's token (it names the blob's SHA-256,
    so the MAC covers the blob too)."""
    meta = UpdateMeta(
        run_id=ident.run_id,
        client_id=ident.client_id,
        round=upd.round,
        base_model_version=upd.base_version,
        num_samples=upd.num_samples,
        encoding=Encoding(upd.encoding),
        is_delta=True,
        blob_sha256=hashlib.sha256(upd.blob).hexdigest(),
        blob_bytes=len(upd.blob),
        metrics={**finite_metrics(upd.metrics)},
    )
    return auth.sign(meta, ident.token)


def publish_update(bus: Bus, meta: UpdateMeta, blob: bytes, chunk_size: int) -> None:
    """The blob as chunks to ``fedmq.updates`` / ``update.<run>.<round>``, the ``UpdateMeta``
    JSON in ``x-fedmq-envelope`` of every chunk."""
    envelope = meta.model_dump_json()
    key = topology.update_routing_key(meta.run_id, int(meta.round or 0), meta.client_id)
    for chunk in chunking.iter_chunks(blob, chunk_size):
        headers = enveloped.headers(chunk, envelope)
        bus.publish(topology.UPDATES_EXCHANGE, key, chunk.data, headers=headers)
