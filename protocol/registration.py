"""Reading the answer to a ``Register``: what an AMQP device and the gateway (which registers
on behalf of HTTP devices) both do with each message on their reply queue.

An answer is the orchestrator's ``Registered`` (signed by the key it names, which must be
the pinned one when there is one; its token sealed to the registration's key pair) or its
refusal (a ``register.rejected`` event, answering the ``Register``'s message id). Anything
else on the queue is ignored: something else on the bus may have answered first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import sealing
from protocol.limits import REGISTER_REJECTED
from protocol.messages import Event, Message, Registered, registered_context
from protocol.signing import SignatureError, Verifier

log = logging.getLogger(__name__)


class Accepted(NamedTuple):
    registered: Registered
    token: str  # unsealed
    signing_key: str  # the orchestrator's, verified


def answer(
    msg: Message,
    body: bytes,
    headers: Mapping[str, Any] | None,
    *,
    run_id: str,
    reply_key: str,
    register_id: str,
    private_key: X25519PrivateKey,
    expected_key: str | None,
) -> Accepted | Event | None:
    """What ``msg`` (``body`` and ``headers`` as received) is to the registration
    ``register_id``: its acceptance, its refusal (verified when a key is pinned: a forged
    refusal would only make the device wait, with a pinned key not even that), or None,
    logged, when it is neither."""
    if isinstance(msg, Event) and msg.kind == REGISTER_REJECTED:
        if msg.correlation_id != register_id:
            return None
        if expected_key is not None:
            try:
                Verifier(expected_key).verify(msg.type, run_id, reply_key, body, headers)
            except SignatureError as e:
                log.warning("dropped a registration refusal for %s: %s", run_id, e)
                return None
        return msg
    if not isinstance(msg, Registered) or msg.reply_key != reply_key:
        return None
    try:
        key = registered_key(msg, run_id, body, headers, expected_key)
    except SignatureError as e:
        log.warning("dropped a registration reply for %s: %s", run_id, e)
        return None
    context = registered_context(run_id, reply_key, msg.client_id)
    try:
        token = sealing.unseal(msg.sealed_token, private_key, context)
    except sealing.SealError as e:
        log.warning("a registration answer for %s that does not open: %s", run_id, e)
        return None  # not sealed to us: someone else's, or forged
    return Accepted(msg, token, key)


def registered_key(
    msg: Registered,
    run_id: str,
    body: bytes,
    headers: Mapping[str, Any] | None,
    expected_key: str | None,
) -> str:
    """The orchestrator key a ``Registered`` reply (``body`` as received) gives: its
    ``signing_key``, if the reply is signed by it for ``run_id`` and its reply key and is
    ``expected_key`` (when one is pinned). ``SignatureError`` otherwise.

    Without a pinned key this is trust on first use: a reply forged by someone who saw the
    ``Register`` and answered first would be believed. ``DeviceConfig.wire.orchestrator_key``
    pins the key beforehand and closes that (docs/architecture.md, "Signed control plane")."""
    if msg.signing_key is None:
        raise SignatureError("the registration reply names no orchestrator signing key")
    if expected_key is not None and msg.signing_key != expected_key:
        raise SignatureError(
            f"the registration reply names orchestrator key {msg.signing_key}, not the pinned "
            f"{expected_key}; not accepting a new key"
        )
    Verifier(msg.signing_key).verify(msg.type, run_id, msg.reply_key, body, headers)
    return msg.signing_key
