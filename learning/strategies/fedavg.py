"""FedAvg: the papers' formula ``w = Σ n_k/n · w_k``.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data". On deltas against the global model w this is ``w + Σ n_k/n · Δ_k``,
folded one update at a time (``WeightedMean``), so memory does not grow with the clients.
"""

from __future__ import annotations

from typing import ClassVar

from learning.strategies.base import Strategy


class FedAvg(Strategy):
    name: ClassVar[str] = "fedavg"
    streaming: ClassVar[bool] = True
