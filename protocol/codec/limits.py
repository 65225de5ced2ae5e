"""Bounds on what ``decode`` will read and allocate."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """Caps checked before the corresponding work is done.

    The defaults fit ResNet-50 in fp32 (~98 MiB) with room to spare; settings pass their
    own values. ``max_decompressed_bytes`` bounds both the zstd payload and the total size
    of the decoded float32/int tensors, since a sparse (top-k) payload can be tiny while the
    dense tensors it describes are not.
    """

    max_compressed_bytes: int = 256 * MiB
    max_decompressed_bytes: int = 512 * MiB
    max_header_bytes: int = 4 * MiB
    max_tensors: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_compressed_bytes", "max_decompressed_bytes", "max_header_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"DecodeLimits.{name} must be >= 0")
        if self.max_tensors < 0:
            raise ValueError("DecodeLimits.max_tensors must be >= 0")
