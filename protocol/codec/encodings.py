"""How one tensor is stored: the encodings, their byte layouts, encode and decode.

A record is a list of typed parts laid out back to back; their dtypes and lengths follow
from (encoding, shape, k) alone, so the decoder recomputes them and never trusts a length.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np

from protocol.codec.bf16 import BF16_OVERFLOW, bf16_to_f32, f32_to_bf16
from protocol.codec.errors import CodecError


class Encoding(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    TOPK = "topk"


RAW = "raw"  # record encoding of non-float tensors, whatever the blob's encoding

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_I8 = np.dtype("i1")

# Smallest float32 magnitude that fp16 rounds to infinity.
FP16_OVERFLOW = 65520.0
# Top-k indices are stored as uint32 gaps.
TOPK_MAX_NUMEL = 1 << 32


def channels(shape: tuple[int, ...]) -> int:
    """int8 scale count: one per output channel (dim 0) for >= 2-d, else a single scale."""
    return shape[0] if len(shape) >= 2 else 1


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    # Explicit, since reshape(0, -1) is ambiguous for empty tensors.
    ch = channels(shape)
    return ch, (math.prod(shape) // ch if ch else 0)


def topk_count(numel: int, fraction: float) -> int:
    return 0 if numel == 0 else min(numel, max(1, math.ceil(fraction * numel)))


def layout(enc: str, shape: tuple[int, ...], dtype: str, k: int) -> list[tuple[np.dtype, int]]:
    """(dtype, element count) of each part of a record, in storage order."""
    numel = math.prod(shape)
    if enc == Encoding.FP32:
        return [(_F32, numel)]
    if enc == Encoding.BF16:
        return [(_U16, numel)]
    if enc == Encoding.FP16:
        return [(_F16, numel)]
    if enc == Encoding.INT8:  # scales first keeps them 4-byte aligned
        return [(_F32, channels(shape)), (_I8, numel)]
    if enc == Encoding.TOPK:
        return [(_U32, k), (_U16, k)]
    return [(np.dtype(dtype).newbyteorder("<"), numel)]


def record_length(parts: list[tuple[np.dtype, int]]) -> int:
    return sum(dt.itemsize * n for dt, n in parts)


def _check_range(name: str, x: np.ndarray, limit: float, enc: str) -> None:
    # min/max are cheap vectorised reductions and both propagate NaN.
    if x.size == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if not (lo > -limit and hi < limit):
        if np.isnan(lo) or np.isnan(hi):
            raise CodecError(f"tensor {name!r} contains NaN")
        if math.isinf(lo) or math.isinf(hi):
            raise CodecError(f"tensor {name!r} contains Inf")
        raise CodecError(f"tensor {name!r} has values beyond the {enc} range (|x| >= {limit:g})")


def encode_float(
    name: str, x: np.ndarray, enc: Encoding, topk_fraction: float
) -> tuple[list[np.ndarray], int]:
    """Parts (1-D contiguous arrays, in layout order) and k for the float32 tensor ``x``."""
    flat = x.reshape(-1)
    if enc == Encoding.FP32:
        _check_range(name, flat, math.inf, enc)
        return [flat.astype(_F32, copy=False)], 0
    if enc == Encoding.BF16:
        _check_range(name, flat, BF16_OVERFLOW, enc)
        return [f32_to_bf16(flat)], 0
    if enc == Encoding.FP16:
        _check_range(name, flat, FP16_OVERFLOW, enc)
        return [flat.astype(_F16)], 0
    if enc == Encoding.INT8:
        _check_range(name, flat, math.inf, enc)
        return _encode_int8(x), 0
    _check_range(name, flat, BF16_OVERFLOW, enc)
    return _encode_topk(name, flat, topk_fraction)


def _encode_int8(x: np.ndarray) -> list[np.ndarray]:
    rows = x.reshape(_rows(x.shape))
    if rows.size == 0:
        return [np.zeros(rows.shape[0], _F32), np.zeros(0, _I8)]
    # Two reductions instead of np.abs(rows).max(): no temporary the size of the tensor.
    amax = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    scales = (amax / np.float32(127.0)).astype(_F32)
    # Divide rather than multiply by 1/scale: a subnormal scale has an infinite reciprocal.
    q = rows / np.where(scales > 0, scales, np.float32(1.0))[:, None]
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return [scales, q.astype(_I8).reshape(-1)]


def _encode_topk(name: str, flat: np.ndarray, fraction: float) -> tuple[list[np.ndarray], int]:
    n = flat.size
    if n >= TOPK_MAX_NUMEL:
        raise CodecError(f"tensor {name!r} has {n} elements, too many for topk (< 2**32)")
    k = topk_count(n, fraction)
    if k == 0:
        return [np.zeros(0, _U32), np.zeros(0, _U16)], 0
    idx = np.argpartition(np.abs(flat), n - k)[n - k :]
    idx.sort()
    # Gaps between sorted indices are small and compress far better than the indices.
    gaps = np.diff(idx, prepend=0).astype(_U32)
    return [gaps, f32_to_bf16(flat[idx])], k


def decode_float(
    name: str, enc: str, parts: list[np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """The float32 tensor stored in ``parts``; refuses NaN and Inf."""
    if enc == Encoding.FP32:
        out = parts[0].astype(np.float32)  # also copies out of the read-only payload
    elif enc == Encoding.BF16:
        out = bf16_to_f32(parts[0])
    elif enc == Encoding.FP16:
        out = parts[0].astype(np.float32)
    elif enc == Encoding.INT8:
        scales, q = parts
        rows = q.reshape(_rows(shape)).astype(np.float32)
        with np.errstate(over="ignore"):  # a hostile scale may overflow; refused below
            rows *= scales.astype(np.float32)[:, None]
        out = rows.reshape(-1)
    else:
        out = _decode_topk(name, parts, math.prod(shape))
    if out.size and not (np.isfinite(out.min()) and np.isfinite(out.max())):
        raise CodecError(f"tensor {name!r} decodes to NaN or Inf")
    return out.reshape(shape)


def _decode_topk(name: str, parts: list[np.ndarray], numel: int) -> np.ndarray:
    gaps, values = parts
    out = np.zeros(numel, dtype=np.float32)
    if gaps.size == 0:
        return out
    if gaps.size > 1 and gaps[1:].min() == 0:
        raise CodecError(f"tensor {name!r}: top-k indices repeat")
    idx = np.cumsum(gaps, dtype=np.int64)
    if idx[-1] >= numel:
        raise CodecError(f"tensor {name!r}: top-k index {idx[-1]} out of range for {numel}")
    out[idx] = bf16_to_f32(values)
    return out
