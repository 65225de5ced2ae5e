"""Staleness weights of asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022).

An update trained on model version ``b`` and folded into the version built on ``v`` has
staleness ``s = v - b``; its delta is scaled by ``weight(policy, s)`` before the buffer is
averaged. Pure functions: the worker and the single-process replica call the same ones.
"""

from __future__ import annotations

import math
from typing import Literal

StalenessPolicy = Literal["poly", "constant", "hinge"]
POLICIES: tuple[StalenessPolicy, ...] = ("poly", "constant", "hinge")

# FedBuff's polynomial weight is (1 + s) ** -POLY_EXPONENT: 1/sqrt(1 + s).
POLY_EXPONENT = 0.5
# The hinge keeps full weight up to HINGE_B versions of staleness, then falls as
# 1 / (HINGE_A * (s - HINGE_B) + 1) (the hinge of Xie et al., FedAsync).
HINGE_A = 10.0
HINGE_B = 4


def weight(policy: str, staleness: int) -> float:
    """The factor of an update ``staleness`` versions behind; 1.0 for a fresh one."""
    if staleness < 0:
        raise ValueError(f"staleness cannot be negative ({staleness})")
    if policy == "poly":
        return float((1.0 + staleness) ** -POLY_EXPONENT)
    if policy == "constant":
        return 1.0
    if policy == "hinge":
        if staleness <= HINGE_B:
            return 1.0
        return 1.0 / (HINGE_A * (staleness - HINGE_B) + 1.0)
    raise ValueError(f"unknown staleness policy {policy!r}; known: {', '.join(POLICIES)}")


def check_policy(policy: str) -> StalenessPolicy:
    if policy not in POLICIES:
        raise ValueError(f"unknown staleness policy {policy!r}; known: {', '.join(POLICIES)}")
    return policy


def histogram(stalenesses: list[int]) -> dict[str, int]:
    """Counts per staleness value, keys as strings (JSON objects and flat metric maps)."""
    out: dict[str, int] = {}
    for s in sorted(stalenesses):
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def is_finite_lr(lr: float) -> bool:
    return math.isfinite(lr) and lr > 0
