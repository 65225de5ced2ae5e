"""Pairwise key agreement and the share channel: X25519, HKDF-SHA256, ChaCha20-Poly1305.

Every primitive comes from ``cryptography``. Each device makes two fresh key pairs per
round, as in Bell et al. (2020) and Flower: ``c`` for the channel that carries Shamir shares
device-to-device through the orchestrator, and ``s`` for the pairwise mask seeds. Only the
``s`` secret key is ever Shamir-shared (to unmask a dropped device), so revealing it opens
no channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocol.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
MASK_INFO = b"fedmq-secagg-mask-1"
CHANNEL_INFO = b"fedmq-secagg-channel-1"


@dataclass(frozen=True)
class RoundKeys:
    """A device's two key pairs for one round (private halves as raw 32 bytes)."""

    c_private: bytes
    s_private: bytes

    @classmethod
    def generate(cls) -> RoundKeys:
        return cls(
            _raw_private(X25519PrivateKey.generate()), _raw_private(X25519PrivateKey.generate())
        )

    @property
    def c_public(self) -> bytes:
        return public_of(self.c_private)

    @property
    def s_public(self) -> bytes:
        return public_of(self.s_private)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_of(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public(public: bytes) -> None:
    if len(public) != KEY_BYTES:
        raise SecAggError(f"a public key is {KEY_BYTES} bytes, not {len(public)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # a low-order point would give an all-zero secret
        raise SecAggError(f"unusable public key: {e}") from None


def agree(private: bytes, peer_public: bytes, info: bytes, context: bytes) -> bytes:
    """A 32-byte secret both ends derive alike: HKDF over the X25519 shared secret.

    ``context`` (run and round) keeps secrets of different rounds apart even if a device
    ever reused a key pair."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as e:
        raise SecAggError(f"key agreement failed: {e}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info + context)
    return hkdf.derive(shared)


def mask_seed(s_private: bytes, peer_s_public: bytes, context: bytes) -> bytes:
    return agree(s_private, peer_s_public, MASK_INFO, context)


def channel_key(c_private: bytes, peer_c_public: bytes, context: bytes) -> bytes:
    return agree(c_private, peer_c_public, CHANNEL_INFO, context)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, box: bytes, associated: bytes) -> bytes:
    if len(box) < NONCE_BYTES + 16:
        raise SecAggError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError("a share ciphertext does not open: wrong key, sender or round") from None
