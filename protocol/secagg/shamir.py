"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A Mersenne prime larger than any 256-bit secret, so a secret is one field element and a
share one (x, y) pair; Python's integers do the arithmetic. Coefficients come from
``secrets``. Any ``t`` shares give the secret back; fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from protocol.secagg.errors import SecAggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares of ``secret`` at the distinct nonzero points ``xs``, any ``threshold`` of
    which reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret is {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} needs between 1 and {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("share points must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _evaluate(coeffs, x) for x in xs}


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    With more than ``threshold`` shares the secret is also rebuilt from the last
    ``threshold`` of them, and the two must agree: one share crafted to shift the secret
    (a malicious holder knows the public Lagrange weights) is then refused with a reason
    instead of silently corrupting the sum. A random wrong share is refused anyway: the
    secret it gives almost surely falls outside 256 bits."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    ordered = sorted(shares.items())
    secret = _interpolate(ordered[:threshold])
    if len(ordered) > threshold and _interpolate(ordered[-threshold:]) != secret:
        raise SecAggError("the shares are inconsistent: one of them was altered")
    return secret


def _interpolate(points: list[tuple[int, int]]) -> bytes:
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("the shares do not belong to one secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def to_bytes(y: int) -> bytes:
    if not 0 <= y < PRIME:
        raise SecAggError("a share is a field element")
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise SecAggError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise SecAggError("a share is a field element")
    return y
