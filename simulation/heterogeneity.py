"""Simulated device heterogeneity for fleets: slow devices, dropouts and late joiners.

Which devices are slow and which join late is drawn once from the run's seed (a
permutation of the device indices: the first ``slow_fraction`` of it are slow, the last
``late_joiners`` join late), so a fleet is reproducible; whether a device drops out of a
given round is drawn by the device itself (``SimulatedBehaviour.dropout``), seeded by round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from devices.config import SimulatedBehaviour


def cli_args(behaviour: SimulatedBehaviour) -> list[str]:
    """``behaviour`` as ``fedmq device`` options (a fleet's device processes)."""
    return [
        "--slowdown",
        str(behaviour.slowdown_s),
        "--dropout",
        str(behaviour.dropout),
        "--join-delay",
        str(behaviour.join_delay_s),
        "--outage",
        str(behaviour.outage_s),
    ]


@dataclass(frozen=True)
class Heterogeneity:
    slow_fraction: float = 0.0  # share of devices that are slow ...
    slowdown_s: float = 0.0  # ... by this many extra seconds per local training
    dropout: float = 0.0  # every device's chance of vanishing for a round it was selected in
    late_joiners: int = 0  # devices that join only ...
    join_delay_s: float = 0.0  # ... this many seconds after the fleet starts

    def __post_init__(self) -> None:
        problems = [
            msg
            for bad, msg in (
                (not 0.0 <= self.slow_fraction <= 1.0, "slow_fraction must be in [0, 1]"),
                (self.slowdown_s < 0, "slowdown_s must be >= 0"),
                (not 0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
                (self.late_joiners < 0, "late_joiners must be >= 0"),
                (self.join_delay_s < 0, "join_delay_s must be >= 0"),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def active(self) -> bool:
        return bool(
            (self.slow_fraction and self.slowdown_s)
            or self.dropout
            or (self.late_joiners and self.join_delay_s)
        )

    def behaviours(
        self, clients: int, seed: int, outage_s: float = 10.0
    ) -> list[SimulatedBehaviour]:
        """Each device's behaviour, index k -> SimulatedBehaviour. A dropped device is silent for
        ``outage_s``: longer than the run's heartbeat timeout, so that the orchestrator
        notices it gone instead of waiting for the round's deadline."""
        if self.late_joiners >= clients:
            raise ValueError(
                f"{self.late_joiners} late joiners leave none of {clients} devices to start with"
            )
        order = np.random.default_rng(seed).permutation(clients).tolist()
        slow = set(order[: math.ceil(round(self.slow_fraction * clients, 9))])
        late = set(order[clients - self.late_joiners :]) if self.late_joiners else set()
        return [
            SimulatedBehaviour(
                slowdown_s=self.slowdown_s if k in slow else 0.0,
                dropout=self.dropout,
                join_delay_s=self.join_delay_s if k in late else 0.0,
                outage_s=outage_s,
            )
            for k in range(clients)
        ]

    def describe(self, clients: int, seed: int) -> str:
        if not self.active:
            return "homogeneous devices"
        b = self.behaviours(clients, seed)
        parts = []
        slow = [k for k, x in enumerate(b) if x.slowdown_s]
        late = [k for k, x in enumerate(b) if x.join_delay_s]
        if slow:
            parts.append(f"slow (+{self.slowdown_s:g} s): devices {slow}")
        if self.dropout:
            parts.append(f"dropout {self.dropout:g} per round")
        if late:
            parts.append(f"late joiners (+{self.join_delay_s:g} s): devices {late}")
        return "; ".join(parts)
