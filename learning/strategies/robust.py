"""Shared base of the robust (coordinate-wise, non-streaming) strategies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from learning.strategies.base import Strategy, Weights


class RobustStrategy(Strategy):
    """Combines all k updates at once, per coordinate; the server step is FedAvg's.

    Sample counts are ignored (each client counts once), as in Yin et al. 2018: a client
    cannot buy influence over a robust statistic by claiming many samples.
    """

    streaming: ClassVar[bool] = False

    def memory_bytes(self, num_updates: int, model_bytes: int) -> int:
        """k float32 updates stacked, plus the float64 result."""
        return num_updates * model_bytes + 2 * model_bytes

    def reduce(self, stacks: Mapping[str, np.ndarray], weights: np.ndarray) -> Weights:
        return {name: self.reduce_tensor(stack) for name, stack in stacks.items()}

    def reduce_tensor(self, stack: np.ndarray) -> np.ndarray:
        """Combine one tensor's (k, *shape) stack; may reorder it in place."""
        raise NotImplementedError
