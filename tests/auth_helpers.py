"""Test helpers for the wire's authentication (protocol/auth.py, protocol/sealing.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import sealing
from protocol.messages import Register, Registered, registered_context


def register(
    run_id: str, name: str, reply_key: str, **kw: Any
) -> tuple[Register, X25519PrivateKey]:
    """A ``Register`` and the private key its answer is sealed to."""
    private, public = sealing.new_keypair()
    return (
        Register(run_id=run_id, display_name=name, reply_key=reply_key, reply_pub=public, **kw),
        private,
    )


def token_of(reply: Registered, keys: X25519PrivateKey | Iterable[X25519PrivateKey]) -> str:
    """The token sealed in ``reply`` to one of ``keys``."""
    context = registered_context(reply.run_id, reply.reply_key, reply.client_id)
    for key in [keys] if isinstance(keys, X25519PrivateKey) else list(keys):
        try:
            return sealing.unseal(reply.sealed_token, key, context)
        except sealing.SealError:
            continue
    raise AssertionError(f"the token of {reply.client_id} is sealed to none of these keys")
