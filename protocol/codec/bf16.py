"""float32 <-> bfloat16 with numpy integer bit operations (no torch, no ml_dtypes).

bfloat16 is the upper half of a float32. Truncating would bias every weight towards zero;
adding 0x7FFF plus the lowest kept bit before the shift rounds to nearest, ties to even,
which is what torch and hardware do.
"""

from __future__ import annotations

import sys

import numpy as np

_HIGH_HALF = 1 if sys.byteorder == "little" else 0

# Smallest float32 magnitude that rounds to bfloat16 infinity (0x7F7F8000 ~ 3.3961e38).
BF16_OVERFLOW = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, same shape) of ``x``, rounded to nearest even.

    NaN stays NaN (quiet, sign kept); values beyond ``BF16_OVERFLOW`` become infinity.
    """
    x = np.asarray(x, dtype=np.float32)
    u = x.reshape(-1).view(np.uint32)  # reshape copies only if x is not contiguous
    t = u >> 16
    t &= 1
    t += 0x7FFF
    t += u  # cannot wrap for non-NaN inputs; NaNs are overwritten below
    h = t.view(np.uint16)[_HIGH_HALF::2].copy()
    if u.size and np.isnan(np.max(x)):  # max propagates NaN: one cheap pass to detect any
        nan = np.isnan(x.reshape(-1))
        h[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return h.reshape(x.shape)


def bf16_to_f32(h: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: every bfloat16 is a float32)."""
    u = np.asarray(h, dtype=np.uint16).astype(np.uint32)
    u <<= 16
    return u.view(np.float32)
