"""Normalising caller tensors (numpy or torch) and describing them as specs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.codec.errors import CodecError

# Non-float dtypes that travel raw; floats always decode as float32.
RAW_DTYPES = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
)
FLOAT_DTYPE = "float32"
ALLOWED_DTYPES = RAW_DTYPES | {FLOAT_DTYPE}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and decoded dtype name of one tensor (``"float32"`` for every float input)."""

    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def as_numpy(name: str, value: Any) -> np.ndarray:
    """A C-contiguous numpy array for ``value``; torch tensors are converted without
    importing torch, so the codec stays usable where torch is not installed."""
    if hasattr(value, "detach"):
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()  # numpy has no bfloat16
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise CodecError(f"tensor {name!r} is not array-like: {e}") from None
    if arr.dtype.kind not in "fiub":
        raise CodecError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
    # Not np.ascontiguousarray for everything: it turns 0-d arrays into 1-d ones.
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f"


def decoded_dtype(arr: np.ndarray) -> str:
    return FLOAT_DTYPE if is_float(arr) else arr.dtype.name


def spec_of(tensors: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """The spec ``decode`` would report for ``tensors``; pass it as ``expected=``."""
    out: dict[str, TensorSpec] = {}
    for name, value in tensors.items():
        arr = as_numpy(name, value)
        out[name] = TensorSpec(tuple(int(d) for d in arr.shape), decoded_dtype(arr))
    return out
