"""A secret sealed to one recipient: X25519 + HKDF-SHA256 + ChaCha20-Poly1305.

Registration is the one moment a secret must cross the bus: the orchestrator makes the
device's token and the device has to learn it. With a shared broker user anyone may bind a
queue to ``fedmq.devices`` and read the ``Registered`` answer, so the token travels sealed to
a key pair the device made for this one registration (its public half is in ``Register``).
A passive reader of the bus learns nothing; someone who can also *consume* the orchestrator's
queues (replace the device's key) is beyond what a shared user can be protected from, which
is why per-device broker users are the default where the management API is reachable.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

INFO = b"fedmq-seal-1"
_NONCE = 12
_KEY = 32


class SealError(ValueError):
    """A sealed box (or a public key) that cannot be used; the text says why."""


def new_keypair() -> tuple[X25519PrivateKey, str]:
    """A fresh key pair: the private key and its public half as 64 hex digits."""
    private = X25519PrivateKey.generate()
    return private, _public_hex(private)


def _public_hex(private: X25519PrivateKey) -> str:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _derive(private: X25519PrivateKey, peer: bytes, eph: bytes, recipient: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as e:  # a low-order point gives an all-zero secret, which is refused
        raise SealError(f"unusable public key: {e}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=INFO + eph + recipient)
    return hkdf.derive(shared)


def check_public_key(public_hex: str) -> None:
    """Raise ``SealError`` unless ``public_hex`` is a key a box can be sealed to."""
    try:
        peer = bytes.fromhex(public_hex)
    except ValueError:
        raise SealError("a public key is 64 hex digits") from None
    if len(peer) != _KEY:
        raise SealError("a public key is 64 hex digits")
    probe = X25519PrivateKey.generate()
    _derive(probe, peer, b"", peer)


def seal(secret: str, recipient_hex: str, context: bytes) -> str:
    """``secret`` readable only with the private key of ``recipient_hex``; ``context``
    (authenticated, not sent) binds the box to what it answers."""
    recipient = bytes.fromhex(recipient_hex)
    eph, eph_pub = new_keypair()
    eph_bytes = bytes.fromhex(eph_pub)
    key = _derive(eph, recipient, eph_bytes, recipient)
    nonce = os.urandom(_NONCE)
    box = ChaCha20Poly1305(key).encrypt(nonce, secret.encode(), context)
    return base64.urlsafe_b64encode(eph_bytes + nonce + box).decode().rstrip("=")


def unseal(box: str, private: X25519PrivateKey, context: bytes) -> str:
    """The secret in ``box`` (``SealError`` if it was not sealed to ``private`` for
    ``context``, or was changed on the way)."""
    try:
        raw = base64.urlsafe_b64decode(box + "=" * (-len(box) % 4))
    except ValueError:
        raise SealError("a sealed box is base64url") from None
    if len(raw) < _KEY + _NONCE + 16:
        raise SealError("sealed box too short")
    eph, nonce, data = raw[:_KEY], raw[_KEY : _KEY + _NONCE], raw[_KEY + _NONCE :]
    key = _derive(private, eph, eph, bytes.fromhex(_public_hex(private)))
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, data, context).decode()
    except (InvalidTag, UnicodeDecodeError):
        raise SealError("the sealed box does not open with this key and context") from None
