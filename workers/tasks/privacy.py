"""Differential privacy in aggregation: central DP-FedAvg and the run's (ε, δ) ledger.

A run with a ``privacy`` block (``learning.privacy.PrivacyConfig``) is accounted round by
round here, on the worker that makes the round's model version:

- **central** mode: every update's delta is clipped to this round's clip norm C (the
  strategy's ``prepare``), the clipped deltas are averaged with uniform weights (sample
  counts are recorded, not used: they would let one device weigh more than C/m), and
  N(0, (z_Δ·C/m)²) is added once to the average, before the strategy's server step (a
  server optimiser only post-processes a private average). Adaptive clipping moves C for
  the next round from the noised unclipped count. Only a weighted-mean strategy can be
  private this way (a median's sensitivity is another story), and the round folds flat:
  the noise is drawn once, where the whole sum is.
- **local** mode: the devices clipped and noised before sending (``devices.local``); the
  worker folds as usual and only keeps the ledger.

The ledger: each version's metrics carry ``privacy`` with this round's (q, z), the whole
history of them (``events``), ε after this round and ε if one more like it were released.
A version whose next round would pass ``epsilon_budget`` says so (``budget_spent``); the
orchestrator then opens no further round. A round that would itself pass the budget (the
sampling rate grew) is refused: its model is never stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from db import queries as q
from db.models import ModelVersion, Round, Run
from learning.privacy import (
    CENTRAL,
    PrivacyConfig,
    PrivacyError,
    RoundEvent,
    adaptive_clip_update,
    add_gaussian_noise,
    epsilon_after,
    epsilon_with_next,
    noise_generator,
    split_noise_multiplier,
)
from learning.privacy.mechanism import default_count_noise_std
from learning.strategies import Accumulator
from workers.tasks.common import AggregationError

PRIVACY_KEY = "privacy"


@dataclass(frozen=True)
class RoundPrivacy:
    """What one round's aggregation needs to know about the run's privacy."""

    config: PrivacyConfig
    clip_norm: float  # this round's (adaptive: carried from the base version)
    history: tuple[RoundEvent, ...]  # the rounds released before this one
    selected: int
    registered: int

    @property
    def central(self) -> bool:
        return self.config.mode == CENTRAL

    @property
    def event(self) -> RoundEvent:
        return RoundEvent(
            min(1.0, self.selected / max(1, self.registered)), self.config.noise_multiplier
        )


def plan_privacy(s: Session, run: Run, rnd: Round, base: ModelVersion) -> RoundPrivacy | None:
    """The round's privacy plan from the run's config and the base version's ledger."""
    block = run.config.get(PRIVACY_KEY)
    if block is None:
        return None
    try:
        cfg = PrivacyConfig.from_dict(block)
    except PrivacyError as e:
        raise AggregationError(f"run config: {e}") from e
    ledger = base.metrics.get(PRIVACY_KEY) or {}
    history = tuple(RoundEvent(float(a), float(b)) for a, b in ledger.get("events", []))
    clip = float(ledger.get("next_clip_norm") or cfg.clip_norm)
    selected = len(q.list_participations(s, rnd.id))
    registered = q.count_run_clients(s, run.id)
    return RoundPrivacy(cfg, clip, history, max(1, selected), max(1, registered, selected))


class UnitWeights:
    """An accumulator that gives every update weight 1 (DP-FedAvg's uniform average)."""

    def __init__(self, inner: Accumulator) -> None:
        self.inner = inner

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        self.inner.add(tensors, 1.0)

    def result(self) -> dict[str, np.ndarray]:
        return self.inner.result()


def release(
    plan: RoundPrivacy,
    delta: Mapping[str, np.ndarray],
    folded: int,
    clipped: int,
    run_id: str,
    round_number: int,
) -> dict[str, Any]:
    """Noise ``delta`` in place (central mode), account the round, and return the
    version's ``privacy`` metrics. AggregationError when the round itself would pass the
    budget (nothing is released)."""
    cfg = plan.config
    event = plan.event
    events = [*plan.history, event]
    epsilon = epsilon_after(events, cfg.delta)
    if cfg.epsilon_budget is not None and epsilon > cfg.epsilon_budget:
        raise AggregationError(
            f"privacy budget: round {round_number} would bring ε to {epsilon:.3f} > budget "
            f"{cfg.epsilon_budget} (δ={cfg.delta}); the model is not released"
        )
    out: dict[str, Any] = {
        "mode": cfg.mode,
        "noise_multiplier": cfg.noise_multiplier,
        "clip_norm": plan.clip_norm,
        "q": event.q,
        "selected": plan.selected,
        "registered": plan.registered,
        "delta": cfg.delta,
        "epsilon": epsilon,
        "epsilon_budget": cfg.epsilon_budget,
        "events": [list(e) for e in events],
        "seeded": cfg.seed is not None,
    }
    if plan.central:
        z = cfg.noise_multiplier
        count_std = 0.0
        if cfg.adaptive:
            count_std = cfg.count_noise_std or default_count_noise_std(folded, z)
            z = split_noise_multiplier(z, count_std)
        std = z * plan.clip_norm / folded
        add_gaussian_noise(delta, std, noise_generator(cfg.seed, run_id, round_number, "update"))
        unclipped = folded - clipped
        out.update(noise_std=std, update_noise_multiplier=z, unclipped=unclipped)
        if cfg.adaptive:
            assert cfg.target_quantile is not None
            rng = noise_generator(cfg.seed, run_id, round_number, "count")
            nxt, frac = adaptive_clip_update(
                plan.clip_norm, unclipped, folded, cfg.target_quantile,
                cfg.clip_learning_rate, count_std, rng,
            )  # fmt: skip
            out.update(next_clip_norm=nxt, unclipped_fraction=frac, count_noise_std=count_std)
    nxt_eps = epsilon_with_next(events, cfg.delta)
    out["epsilon_next"] = nxt_eps
    out["budget_spent"] = None
    if cfg.epsilon_budget is not None and nxt_eps > cfg.epsilon_budget:
        out["budget_spent"] = (
            f"privacy budget spent: ε = {epsilon:.3f} after round {round_number}; one more "
            f"round would reach {nxt_eps:.3f} > {cfg.epsilon_budget} (δ={cfg.delta})"
        )
    if math.isinf(epsilon):
        out["epsilon"] = None  # JSON has no inf: None means unbounded (no noise)
    if math.isinf(nxt_eps):
        out["epsilon_next"] = None
    return out
