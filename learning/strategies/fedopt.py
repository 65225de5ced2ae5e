"""The adaptive server optimisers FedAdam, FedYogi and FedAdagrad share this step.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2. The server
treats the aggregated client delta as a pseudo-gradient ``g = -Δ`` and keeps, per
parameter, a first moment ``m`` and a second moment ``v``:

    m ← β1·m + (1 - β1)·g
    v ← second_moment(v, g²)              (Adagrad, Adam or Yogi: see the subclasses)
    w ← w - η · m / (√v + τ)

As in the paper, there is no bias correction; ``v`` starts at ``τ²`` (the paper's
``v_{-1} ≥ τ²``) and ``m`` at 0. ``m`` and ``v`` are the server state kept between rounds.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from learning.strategies.base import Strategy, StrategyError


class FedOpt(Strategy):
    """Base of the adaptive optimisers; a subclass sets defaults and ``second_moment``."""

    state_slots: ClassVar[tuple[str, ...]] = ("m", "v")
    default_eta: ClassVar[float] = 0.1
    default_beta_1: ClassVar[float] = 0.9
    default_beta_2: ClassVar[float] = 0.99
    default_tau: ClassVar[float] = 1e-9

    def __init__(
        self,
        *,
        eta: float | None = None,
        beta_1: float | None = None,
        beta_2: float | None = None,
        tau: float | None = None,
        clip_norm: float | None = None,
    ) -> None:
        super().__init__(clip_norm=clip_norm)
        self.eta = float(self.default_eta if eta is None else eta)
        self.beta_1 = float(self.default_beta_1 if beta_1 is None else beta_1)
        self.beta_2 = float(self.default_beta_2 if beta_2 is None else beta_2)
        self.tau = float(self.default_tau if tau is None else tau)
        if not self.eta > 0:
            raise StrategyError(f"{self.name}: eta (server learning rate) must be > 0")
        for label, beta in (("beta_1", self.beta_1), ("beta_2", self.beta_2)):
            if not 0 <= beta < 1:
                raise StrategyError(f"{self.name}: {label} must be in [0, 1), got {beta}")
        if not self.tau > 0:
            raise StrategyError(f"{self.name}: tau (adaptivity) must be > 0")

    def params(self) -> dict[str, Any]:
        return {
            "eta": self.eta,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
            **super().params(),
        }

    @abstractmethod
    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        """The new ``v`` from the previous one and the squared pseudo-gradient."""

    def step_tensor(
        self, w: np.ndarray, delta: np.ndarray, slots: dict[str, np.ndarray | None]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        g = -delta
        m_prev = slots["m"]
        v_prev = slots["v"]
        m_prev = np.zeros_like(g) if m_prev is None else m_prev
        v_prev = np.full_like(g, self.tau**2) if v_prev is None else v_prev
        m = self.beta_1 * m_prev + (1.0 - self.beta_1) * g
        v = self.second_moment(v_prev, g * g)
        return w - self.eta * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}
