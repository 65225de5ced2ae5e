"""Byte-plane shuffling: store byte j of every element together (as blosc/HDF5 do).

The high bytes of floats (sign and exponent) are few distinct values and compress well; the
low mantissa bytes are close to random. Interleaved, zstd sees a mix of both and compresses
the good half poorly; separated, it codes each half on its own. It does not always pay
(e.g. for already-sparse data), so ``"auto"`` measures on a sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zstandard

# Tensors up to this size are shuffled without measuring: the sample would be the whole
# tensor, and on float data shuffling wins or is a wash at this size.
_SAMPLE_BYTES = 32 * 1024


def write_part(dest: np.ndarray, arr: np.ndarray, shuffle: bool) -> None:
    """Copy the 1-D contiguous ``arr`` into the uint8 slice ``dest`` (byte planes if asked)."""
    k, n = arr.itemsize, arr.size
    src = arr.view(np.uint8)
    if shuffle and k > 1:
        planes = dest.reshape(k, n)
        rows = src.reshape(n, k)
        for j in range(k):
            planes[j] = rows[:, j]
    else:
        dest[...] = src


_ONE_PASS_BYTES = 64 << 10


def read_part(src: np.ndarray, dtype: np.dtype, n: int, shuffle: bool) -> np.ndarray:
    """The ``n`` elements of ``dtype`` stored in the uint8 slice ``src``.

    Unshuffled data comes back as a (read-only) view; callers copy what they keep.
    """
    k = dtype.itemsize
    if shuffle and k > 1:
        if n * k <= _ONE_PASS_BYTES:
            # Small: one transposing copy, not k calls (a 1 KB update's tensors are tiny).
            return src.reshape(k, n).T.copy().view(dtype).reshape(n)
        out = np.empty(n, dtype=dtype)
        rows = out.view(np.uint8).reshape(n, k)
        planes = src.reshape(k, n)
        for j in range(k):  # large: plane by plane streams memory better than the transpose
            rows[:, j] = planes[j]
        return out
    return src.view(dtype)


def prefers_shuffle(parts: Sequence[np.ndarray], cctx: zstandard.ZstdCompressor) -> bool:
    """Whether shuffling the byte planes of ``parts`` makes them compress smaller.

    Decided on a sample from the middle of the largest part, each plane compressed on its
    own: in a large tensor every plane spans many zstd blocks, each with its own entropy
    tables, which compressing the shuffled sample as one block would not reflect.
    """
    big = max(parts, key=lambda p: p.nbytes)
    k = big.itemsize
    if k == 1:
        return False
    if big.nbytes <= 2 * _SAMPLE_BYTES:
        return True
    n = _SAMPLE_BYTES // k
    start = (big.size - n) // 2
    sample = big[start : start + n]
    rows = sample.view(np.uint8).reshape(n, k)
    shuffled = sum(len(cctx.compress(rows[:, j].tobytes())) for j in range(k))
    return shuffled < len(cctx.compress(sample.tobytes()))
