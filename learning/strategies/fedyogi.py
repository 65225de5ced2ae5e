"""FedYogi: Yogi as the server optimiser, ``v ← v - (1 - β2)·g²·sign(v - g²)``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR); Yogi is Zaheer et al. 2018.
The additive update lets ``v`` shrink slowly, unlike Adam's. Defaults follow Flower's
FedYogi: η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from learning.strategies.fedopt import FedOpt


class FedYogi(FedOpt):
    name: ClassVar[str] = "fedyogi"
    default_eta: ClassVar[float] = 0.01
    default_tau: ClassVar[float] = 1e-3

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        out: np.ndarray = v - (1.0 - self.beta_2) * g2 * np.sign(v - g2)
        return out
