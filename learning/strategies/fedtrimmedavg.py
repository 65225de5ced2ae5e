"""FedTrimmedAvg: the coordinate-wise β-trimmed mean of the client updates.

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML). Per coordinate, the ``floor(β·k)`` largest and smallest values are dropped
and the rest averaged (unweighted). β = 0 is the plain mean; β near 0.5 nears the median.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from learning.strategies.aggregate import trimmed_mean
from learning.strategies.base import StrategyError
from learning.strategies.robust import RobustStrategy


class FedTrimmedAvg(RobustStrategy):
    name: ClassVar[str] = "fedtrimmedavg"

    def __init__(self, *, beta: float = 0.2, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        if not 0 <= beta < 0.5:
            raise StrategyError(f"fedtrimmedavg: beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta, **super().params()}

    def reduce_tensor(self, stack: np.ndarray) -> np.ndarray:
        return trimmed_mean(stack, self.beta)
