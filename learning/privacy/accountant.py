"""(ε, δ) of a run so far, from Google's ``dp-accounting`` RDP accountant.

Each round is one Poisson-subsampled Gaussian mechanism (``PoissonSampledDpEvent(q,
GaussianDpEvent(z))``) with q = devices selected / devices registered for that round.
fedmq samples a fixed number of devices without replacement, not each one independently
with probability q; treating it as Poisson sampling at the same rate is the usual
approximation (Flower and TensorFlow Federated report it the same way). q = 1 (every
device every round) is the plain Gaussian mechanism. The guarantee is device-level: it
covers adding or removing one device's whole data.

RDP orders are the integers 2..256: fractional orders near 1 fail to converge in the
library for large q (it logs and drops them), and integer orders make ε reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import dp_accounting

ORDERS = tuple(range(2, 257))


class RoundEvent(NamedTuple):
    """One round's release: sampling rate and noise multiplier."""

    q: float
    z: float


def _event(ev: RoundEvent) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(ev.z)
    if ev.q >= 1:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(ev.q, gaussian)


def epsilon_after(events: Iterable[RoundEvent], delta: float) -> float:
    """ε at ``delta`` after composing ``events`` (inf when a round had no noise)."""
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    runs: list[tuple[RoundEvent, int]] = []
    for ev in events:
        if ev.z <= 0:
            return math.inf
        if runs and runs[-1][0] == ev:
            runs[-1] = (ev, runs[-1][1] + 1)
        else:
            runs.append((ev, 1))
    if not runs:
        return 0.0
    for ev, count in runs:
        accountant.compose(_event(ev), count)
    return float(accountant.get_epsilon(delta))


def epsilon_with_next(events: list[RoundEvent], delta: float) -> float:
    """ε if one more round like the last were released: what the budget check compares."""
    if not events:
        return 0.0
    return epsilon_after([*events, events[-1]], delta)
