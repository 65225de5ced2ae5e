"""A run's SecAgg+ settings, and the graph degree and threshold they give a round."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from protocol.secagg.errors import SecAggError


@dataclass(frozen=True)
class SecAggConfig:
    """``degree``: neighbours per device (None: ``2 * ceil(log2 n)``, at least 4, the
    O(log n) of Bell et al.; n - 1 or more is plain all-pairs SecAgg). ``threshold``:
    shares that reconstruct a secret, as a fraction of the degree: ``floor(threshold *
    degree) + 1``. The default 0.4 lets 40 % of a device's neighbours be gone and its
    secrets still be rebuilt (K = 10: degree 8, threshold 4, so 30 % dropping after
    masking and one more before still completes); above 0.5 a server that told disjoint
    halves of the neighbours different survivor lists still could not collect both
    secrets of one device, at the price of rounds that fail sooner (README, threat
    model). ``clip``: each coordinate of an update is
    clipped to ``[-clip, clip]`` before quantisation."""

    degree: int | None = None
    threshold: float = 0.4
    clip: float = 4.0

    def __post_init__(self) -> None:
        if self.degree is not None and self.degree < 2:
            raise SecAggError("secagg degree is at least 2")
        if not 0 < self.threshold < 1:
            raise SecAggError("secagg threshold is a fraction in (0, 1)")
        if not 0 < self.clip < 1e6:
            raise SecAggError("secagg clip is positive")

    def degree_for(self, n: int) -> int:
        want = self.degree if self.degree is not None else max(4, 2 * math.ceil(math.log2(n)))
        want += want % 2
        return max(1, min(want, n - 1))

    def threshold_for(self, n: int) -> int:
        """Shares needed: more than ``threshold`` of the degree, at least 2 if possible."""
        k = self.degree_for(n)
        return min(k, max(2, math.floor(self.threshold * k) + 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> SecAggConfig:
        raw = dict(raw or {})
        unknown = set(raw) - {"degree", "threshold", "clip", "enabled"}
        if unknown:
            raise SecAggError(f"unknown secagg settings: {sorted(unknown)}")
        raw.pop("enabled", None)
        try:
            return cls(**raw)
        except TypeError as e:
            raise SecAggError(str(e)) from None
