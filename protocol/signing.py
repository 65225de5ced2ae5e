"""Ed25519 signatures on everything the orchestrator tells devices.

A device's queue (``device.<client>``, bound to ``broadcast.<run>``) can be written by
anyone allowed to publish on ``fedmq.devices``; with one shared broker user that is every
device. So each message the orchestrator sends there carries ``x-fedmq-signature``: an
Ed25519 signature (RFC 8032, from ``cryptography``) over

    b"fedmq-orchestrator-signature/1" NUL kind NUL run_id NUL recipient NUL headers NUL body

- ``kind``: what the receiver takes it for: ``model`` (a model chunk) or the JSON
  envelope's ``type`` (``round``, ``event``, ``registered``), so bytes signed as one kind
  cannot be passed off as another.
- ``run_id``: the run it belongs to, so a message signed for one run is refused in another.
- ``recipient``: the client id (or, for the registration reply, the reply key) it is for;
  ``*`` for what goes to the whole run (model chunks and round announcements, published on
  ``broadcast.<run>``). A notice signed for one device is refused by every other.
- ``headers``: for model chunks, the ``x-fedmq-*`` headers (chunk fields and the
  ``ModelMeta`` envelope) as compact JSON with sorted keys; empty for JSON messages, which
  carry everything in their body.
- ``body``: the exact bytes sent.

The verifier builds the context from what it knows itself (its run, its client id, how
it is about to use the message), never from the message, so the signature check is the
one thing that decides. kind, run id and recipient are words without NUL (ids are
``[A-Za-z0-9_-]``), and the header JSON escapes control characters, so the fields cannot
run into one another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEADER = "x-fedmq-signature"
DOMAIN = b"fedmq-orchestrator-signature/1"
BROADCAST = "*"  # the recipient of what goes to every device of a run
MODEL_KIND = "model"  # a model chunk (raw bytes; its envelope is a header)
# What travels on ``broadcast.<run>``: signed for the whole run, not for one device.
# A secure round's roster and unmask request are the same for all its devices (SecAgg+).
BROADCAST_KINDS = frozenset({MODEL_KIND, "round", "secagg_roster", "secagg_unmask"})
KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A message that is unsigned, or not signed by the expected key for this context."""


def recipient_for(kind: str, client_id: str) -> str:
    """Whom a message of ``kind`` arriving at ``client_id`` must have been signed for."""
    return BROADCAST if kind in BROADCAST_KINDS else client_id


def signed_bytes(
    kind: str,
    run_id: str,
    recipient: str,
    body: bytes,
    headers: Mapping[str, Any] | None = None,
) -> bytes:
    """The exact bytes a signature covers (see the module docstring)."""
    for name, word in (("kind", kind), ("run_id", run_id), ("recipient", recipient)):
        if not word or "\0" in word:
            raise ValueError(f"{name} {word!r} cannot be signed")
    covered = b""
    if kind == MODEL_KIND:
        fields = {
            k: v
            for k, v in (headers or {}).items()
            if k.startswith("x-fedmq-") and k != SIGNATURE_HEADER
        }
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=_header)
        covered = text.encode()
    return b"\0".join([DOMAIN, kind.encode(), run_id.encode(), recipient.encode(), covered, body])


def _header(value: Any) -> Any:
    if isinstance(value, bytes):  # an AMQP client may hand a header string back as bytes
        return value.decode("utf-8", "replace")
    raise TypeError(f"header value of type {type(value).__name__} cannot be signed")


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decode_public_key(text: str) -> bytes:
    """The raw 32-byte key of its base64 text; ``SignatureError`` if it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"not a base64 public key: {text[:64]!r}") from None
    if len(raw) != KEY_BYTES:
        raise SignatureError(f"an Ed25519 public key has {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def generate_key() -> tuple[bytes, bytes]:
    """A new key pair: (private key, public key), both raw 32 bytes."""
    private = Ed25519PrivateKey.generate()
    return _raw_private(private), _raw_public(private.public_key())


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Signer:
    """The orchestrator's side: signs with its private key (raw 32 bytes)."""

    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)
        self.public_key = encode_key(_raw_public(self._key.public_key()))

    def sign(
        self,
        kind: str,
        run_id: str,
        recipient: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """The value of ``x-fedmq-signature`` for this message (base64)."""
        return encode_key(self._key.sign(signed_bytes(kind, run_id, recipient, body, headers)))

    def signed_headers(
        self,
        kind: str,
        run_id: str,
        recipient: str,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``headers`` plus the signature header."""
        sig = self.sign(kind, run_id, recipient, body, headers)
        return {**(headers or {}), SIGNATURE_HEADER: sig}


class _Verified:
    """Broadcast signatures this process has verified: (key, signature, SHA-256 of the
    signed bytes), the most recent ``size``.

    A run's model chunks and round announcements reach every device of the run with the
    same bytes and signature, and an embedded fleet's K devices (one process) pinned the
    same key: each verified them again, K Ed25519 checks (0.1 ms each) of one message per
    round. An entry is only ever made by a verification that passed, and a hit needs the
    same key, the same signature and the same digest of the same signed bytes, so it
    proves what verifying again would.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, entry: bytes) -> bool:
        with self._lock:
            if entry not in self._seen:
                return False
            self._seen.move_to_end(entry)
            return True

    def add(self, entry: bytes) -> None:
        with self._lock:
            self._seen[entry] = None
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)


_VERIFIED = _Verified()


class Verifier:
    """A device's side: the orchestrator's public key it pinned at registration."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self._raw = decode_public_key(public_key)
        self._key = Ed25519PublicKey.from_public_bytes(self._raw)

    def verify(
        self,
        kind: str,
        run_id: str,
        recipient: str,
        body: bytes,
        headers: Mapping[str, Any] | None,
    ) -> None:
        """Returns if the message carries a good signature for this context; else raises
        ``SignatureError`` whose text is the reason to log."""
        raw = (headers or {}).get(SIGNATURE_HEADER)
        if raw is None:
            raise SignatureError(f"unsigned {kind} message")
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", "replace")
        try:
            sig = base64.b64decode(str(raw), validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"{kind} message with a malformed signature") from None
        if len(sig) != SIGNATURE_BYTES:
            raise SignatureError(f"{kind} message with a malformed signature")
        try:
            data = signed_bytes(kind, run_id, recipient, body, headers)
            seen = None
            if recipient == BROADCAST:
                seen = self._raw + sig + hashlib.sha256(data).digest()
                if seen in _VERIFIED:
                    return
            self._key.verify(sig, data)
            if seen is not None:
                _VERIFIED.add(seen)
        except InvalidSignature:
            raise SignatureError(
                f"{kind} message not signed by the pinned orchestrator key for run {run_id} "
                f"and {'this run' if recipient == BROADCAST else 'this device'} "
                "(forged, altered, or replayed from elsewhere)"
            ) from None
        except ValueError as e:
            raise SignatureError(f"{kind} message cannot be checked: {e}") from None
