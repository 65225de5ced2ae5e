"""FedAvgM: FedAvg with server momentum.

Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification". With the pseudo-gradient ``g = -Δ``:
``v ← β·v + g``; ``w ← w - η·v`` (Nesterov: ``w ← w - η·(g + β·v)``).
The momentum ``v`` is server state, kept between rounds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from learning.strategies.base import Strategy, StrategyError


class FedAvgM(Strategy):
    name: ClassVar[str] = "fedavgm"
    state_slots: ClassVar[tuple[str, ...]] = ("momentum",)

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.9,
        nesterov: bool = False,
        clip_norm: float | None = None,
    ) -> None:
        super().__init__(clip_norm=clip_norm)
        if not server_learning_rate > 0:
            raise StrategyError("fedavgm: server_learning_rate must be > 0")
        if not 0 <= server_momentum < 1:
            raise StrategyError("fedavgm: server_momentum must be in [0, 1)")
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.nesterov = bool(nesterov)

    def params(self) -> dict[str, Any]:
        return {
            "server_learning_rate": self.server_learning_rate,
            "server_momentum": self.server_momentum,
            "nesterov": self.nesterov,
            **super().params(),
        }

    def step_tensor(
        self, w: np.ndarray, delta: np.ndarray, slots: dict[str, np.ndarray | None]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        g = -delta
        v = slots["momentum"]
        v = g if v is None else self.server_momentum * v + g
        direction = g + self.server_momentum * v if self.nesterov else v
        return w - self.server_learning_rate * direction, {"momentum": v}
