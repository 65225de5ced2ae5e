"""Authenticating a message without sending the secret: an HMAC-SHA256 tag.

Devices and operators used to put their token in every message (``Signal.token``,
``UpdateMeta.token`` in chunk headers, ``Command.operator_token``): with a shared broker
user, anyone who bound a queue to the exchanges read them. Now a message carries ``mac``:

    key  = SHA-256(secret)                       (what the orchestrator stores for a client)
    tag  = HMAC-SHA256(key, "fedmq-mac-1" LF type LF run_id LF client_id LF message_id
                             LF timestamp LF SHA-256(body))

where ``body`` is the message's JSON without ``mac`` as ``protocol.messages`` writes it
(an update's body names its blob's SHA-256, so the tag covers the blob too). The receiver
recomputes it over the message it parsed, compares in constant time, and refuses a
timestamp more than a window away from its clock. Exact replays inside the window are
what message-id de-duplication already stops.

The key is the SHA-256 of the secret, not the secret: it is what the database already holds
for a client (``db.queries.hash_token``), so the orchestrator needs no new secret at rest,
and what a database leak gives away (forging bus messages) never includes the token itself
(a device's broker password and its bearer token at the gateway).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TypeVar

from protocol.messages.envelope import Envelope

VERSION = "fedmq-mac-1"
DEFAULT_WINDOW_S = 900.0
M = TypeVar("M", bound=Envelope)


def mac_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def body_digest(msg: Envelope) -> str:
    return hashlib.sha256(msg.model_dump_json(exclude={"mac"}).encode()).hexdigest()


def mac_input(msg: Envelope) -> bytes:
    fields = (
        VERSION,
        msg.type,
        msg.run_id,
        msg.client_id or "",
        msg.message_id,
        msg.timestamp.isoformat(),
        body_digest(msg),
    )
    return "\n".join(fields).encode()


def compute_mac(msg: Envelope, key: bytes) -> str:
    return hmac.new(key, mac_input(msg), hashlib.sha256).hexdigest()


def sign(msg: M, secret: str) -> M:
    """``msg`` with its ``mac`` under ``secret`` (a device's token, the operator token)."""
    return sign_with_key(msg, mac_key(secret))


def sign_with_key(msg: M, key: bytes) -> M:
    return msg.model_copy(update={"mac": compute_mac(msg, key)})


def check(msg: Envelope, key: bytes | None, *, now: float, window_s: float) -> str | None:
    """None when ``msg`` carries a right and fresh tag under ``key``; else why not
    (``key`` None: the sender is unknown)."""
    who = msg.client_id or "the operator"
    tag = getattr(msg, "mac", None)
    if tag is None:
        return f"no MAC on a {msg.type} message from {who}"
    if key is None or not hmac.compare_digest(compute_mac(msg, key), tag):
        return f"unknown client or bad MAC for {who}" if msg.client_id else "bad operator MAC"
    age = now - msg.timestamp.timestamp()
    if age > window_s:
        return (
            f"stale {msg.type} message from {who}: sent {age:.0f} s ago (window {window_s:.0f} s)"
        )
    if age < -window_s:
        return (
            f"{msg.type} message from {who} is dated {-age:.0f} s ahead of this clock "
            f"(window {window_s:.0f} s)"
        )
    return None
