"""FedAdagrad: Adagrad as the server optimiser, ``v ← v + g²``.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR). Defaults follow Flower's
FedAdagrad: η = 0.1, τ = 1e-9 and β1 = 0 (no momentum: plain Adagrad); β2 is unused.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from learning.strategies.fedopt import FedOpt


class FedAdagrad(FedOpt):
    name: ClassVar[str] = "fedadagrad"
    default_beta_1: ClassVar[float] = 0.0

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        out: np.ndarray = v + g2
        return out
