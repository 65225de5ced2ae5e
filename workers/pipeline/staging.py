"""Host staging for the device folder: one flat float32 layout per model, and the
rotation of the staging buffers. Pure logic, tested on the CPU.

Why the rotation needs care: a host-to-device copy with ``non_blocking=True`` from pinned
memory returns before the bytes have moved; the DMA engine reads the host buffer later.
Writing the next update into that buffer before the copy has finished would send a mix of
two updates to the device. With ``n`` buffers, update k goes to buffer ``k mod n``, whose
previous copy (update ``k - n``) must have completed first; with n = 2, staging update
k+1 (the CPU packing it) overlaps the copy of update k, and waits only on update k-1's,
which has long finished by then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Slot:
    """Where update ``k`` is staged: ``buffer``, free once the copy of update ``reuses``
    (the buffer's previous user; None the first time round) has completed."""

    buffer: int
    reuses: int | None


def staging_slot(k: int, num_buffers: int) -> Slot:
    """The staging buffer of update ``k`` (0-based) in a ring of ``num_buffers``."""
    if num_buffers < 1:
        raise ValueError(f"need at least one staging buffer, got {num_buffers}")
    if k < 0:
        raise ValueError(f"update index must be >= 0, got {k}")
    return Slot(k % num_buffers, k - num_buffers if k >= num_buffers else None)


@dataclass(frozen=True)
class FlatLayout:
    """Tensors laid end to end in one flat array, in the first update's order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start of each tensor in the flat array
    size: int

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> FlatLayout:
        names, shapes, offsets = [], [], []
        at = 0
        for name, t in tensors.items():
            shape = tuple(int(d) for d in np.shape(t))
            names.append(name)
            shapes.append(shape)
            offsets.append(at)
            at += int(np.prod(shape, dtype=np.int64))
        return cls(tuple(names), tuple(shapes), tuple(offsets), at)

    def check(self, tensors: Mapping[str, np.ndarray]) -> None:
        """ValueError unless ``tensors`` has this layout's names and shapes (the same
        messages as learning's WeightedMean)."""
        if tensors.keys() != set(self.names):
            raise ValueError("update has different tensors than the first one")
        for name, shape in zip(self.names, self.shapes, strict=True):
            if np.shape(tensors[name]) != shape:
                raise ValueError(f"tensor {name!r} is {np.shape(tensors[name])}, expected {shape}")

    def pack(self, tensors: Mapping[str, np.ndarray], out: np.ndarray) -> None:
        """Copy ``tensors`` into the flat ``out`` (cast to its dtype)."""
        if out.shape != (self.size,):
            raise ValueError(f"staging buffer holds {out.shape}, not ({self.size},)")
        for name, start, shape in zip(self.names, self.offsets, self.shapes, strict=True):
            end = start + int(np.prod(shape, dtype=np.int64))
            np.copyto(out[start:end], np.asarray(tensors[name]).reshape(-1), casting="same_kind")

    def unpack(self, flat: np.ndarray) -> Weights:
        """Views of ``flat`` with this layout's names and shapes."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat array holds {flat.shape}, not ({self.size},)")
        return {
            name: flat[start : start + int(np.prod(shape, dtype=np.int64))].reshape(shape)
            for name, start, shape in zip(self.names, self.offsets, self.shapes, strict=True)
        }
