"""The PRG that expands a 32-byte seed into a mask vector of uint32.

ChaCha20's keystream from ``cryptography`` (OpenSSL), with the seed as key and a zero
nonce: a standard stream cipher, so masks are computationally indistinguishable from
uniform over Z_2^32, and the keystream is the same on every platform and library version
(numpy's Philox would be fast too, but its stream is numpy's to change). A zero nonce is
safe because every seed is used for one expansion only: the seeds are fresh per round
(HKDF output bound to the run and round, or a random self-mask seed).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from protocol.secagg.errors import SecAggError

SEED_BYTES = 32
_NONCE = bytes(16)  # cryptography's ChaCha20 takes a 16-byte counter + nonce


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of ChaCha20 keystream under ``seed``."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a PRG seed is {SEED_BYTES} bytes, not {len(seed)}")
    if length < 0:
        raise SecAggError("a mask length is not negative")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
