"""FedAdam: Adam as the server optimiser, ``v ← β2·v + (1 - β2)·g²``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR); the shared step is in
``fedopt.py``. Defaults follow Flower's FedAdam: η = 0.1, β1 = 0.9, β2 = 0.99, τ = 1e-9.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from learning.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    name: ClassVar[str] = "fedadam"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * g2
