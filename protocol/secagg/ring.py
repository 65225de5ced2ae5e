"""Fixed-point quantisation to the ring Z_2^32, with the FedAvg weight folded in.

A device clips each coordinate of its update to ``[-clip, clip]``, multiplies by its
sample count ``n`` and by the round's ``scale``, rounds to the nearest integer and takes it
mod 2^32. The sum over any set of devices of those integers, read back as a signed 32-bit
number, is exact (no wrap) as long as ``clip * scale * sum(n) < 2^31``; ``choose_scale``
picks the largest such scale for the round's announced sample counts, so the weighted
mean ``sum / (scale * sum(n))`` loses at most ``0.5 * devices / (scale * sum(n))`` per
coordinate to rounding. Sample counts themselves are not secret: they are summed in the
clear (Bell et al. do the same), only the weighted updates are masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocol.secagg.errors import SecAggError

MODULUS = 1 << 32
HALF = 1 << 31
_MASK = np.uint64(MODULUS - 1)


def choose_scale(clip: float, total_weight: int) -> int:
    """The largest integer scale for which the round's weighted sum cannot wrap."""
    if clip <= 0 or total_weight < 1:
        raise SecAggError("scale needs a positive clip and at least one sample")
    scale = int((HALF - 1) // (clip * total_weight))
    if scale < 1:
        raise SecAggError(
            f"clip {clip} x {total_weight} samples does not fit the 32-bit ring; lower the clip"
        )
    return scale


def quantize(update: np.ndarray, weight: int, clip: float, scale: int) -> np.ndarray:
    """``round(clip(update) * weight * scale) mod 2^32`` as uint32."""
    if weight < 1 or scale < 1:
        raise SecAggError("weight and scale are positive integers")
    x = np.clip(np.asarray(update, dtype=np.float64), -clip, clip)
    if not np.all(np.isfinite(x)):
        raise SecAggError("an update to quantise has NaN")
    q = np.rint(x * (float(weight) * float(scale))).astype(np.int64)
    return (q.view(np.uint64) & _MASK).astype(np.uint32)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Addition in Z_2^32 (uint32 wraps)."""
    return (a.astype(np.uint32) + b.astype(np.uint32)).astype(np.uint32)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) - b.astype(np.uint32)).astype(np.uint32)


def to_signed(total: np.ndarray) -> np.ndarray:
    return total.astype(np.uint32).view(np.int32).astype(np.int64)


def dequantize_mean(total: np.ndarray, total_weight: int, scale: int) -> np.ndarray:
    """The weighted mean from the ring sum of ``quantize(u_i, n_i, clip, scale)``."""
    if total_weight < 1:
        raise SecAggError("no samples to average over")
    return (to_signed(total) / (float(scale) * float(total_weight))).astype(np.float32)


Layout = Sequence[tuple[str, tuple[int, ...]]]


def layout_of(params: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """The order masks run over: tensors by name, each row-major."""
    return [(name, tuple(params[name].shape)) for name in sorted(params)]


def flatten(params: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    if sorted(params) != [name for name, _ in layout]:
        raise SecAggError("the update's tensors are not the model's")
    parts = []
    for name, shape in layout:
        if tuple(params[name].shape) != shape:
            raise SecAggError(f"{name}: shape {params[name].shape}, expected {shape}")
        parts.append(np.asarray(params[name], dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    at = 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vec[at : at + size].reshape(shape)
        at += size
    if at != vec.size:
        raise SecAggError(f"a vector of {vec.size} values for a layout of {at}")
    return out
