"""FedMedian: the coordinate-wise median of the client updates.

Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates" (ICML). Robust to a minority of arbitrary (Byzantine) updates; unweighted.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from learning.strategies.aggregate import coordinate_median
from learning.strategies.robust import RobustStrategy


class FedMedian(RobustStrategy):
    name: ClassVar[str] = "fedmedian"

    def reduce_tensor(self, stack: np.ndarray) -> np.ndarray:
        return coordinate_median(stack)
