"""FedProx: FedAvg on the server, a proximal term in each client's local objective.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys). Clients
minimise ``F_k(w) + mu/2 · ‖w - w_global‖²``; the server aggregates exactly like FedAvg.
``proximal_mu`` is recorded in the run's strategy config, and ``client_config()`` hands it to
the clients' trainer: the composition root (``fedmq.wiring.run_configs``) writes it into the
run's train config, which every round announces to the devices.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from learning.strategies.base import StrategyError
from learning.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        if not (np.isfinite(proximal_mu) and proximal_mu >= 0):
            raise StrategyError(f"fedprox: proximal_mu must be >= 0, got {proximal_mu!r}")
        self.proximal_mu = float(proximal_mu)

    def params(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu, **super().params()}

    def client_config(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
