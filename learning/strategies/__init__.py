"""Aggregation strategies: one module per strategy, one registry.

``make_strategy("fedadam", eta=0.05)`` builds one by name; ``strategy_from_config`` builds
one from a run's config (``{"name": "fedavg", ...params}``; None or {} means FedAvg).
The contract is in ``base.py``; the plain-array math in ``aggregate.py`` and ``clip.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from learning.strategies.aggregate import (
    PartialSum,
    StackedUpdates,
    WeightedMean,
    coordinate_median,
    trimmed_mean,
    weighted_average,
)
from learning.strategies.base import (
    Accumulator,
    MemoryCapExceeded,
    State,
    Strategy,
    StrategyError,
    Weights,
)
from learning.strategies.clip import clip_by_norm, global_norm
from learning.strategies.fedadagrad import FedAdagrad
from learning.strategies.fedadam import FedAdam
from learning.strategies.fedavg import FedAvg
from learning.strategies.fedavgm import FedAvgM
from learning.strategies.fedmedian import FedMedian
from learning.strategies.fedprox import FedProx
from learning.strategies.fedtrimmedavg import FedTrimmedAvg
from learning.strategies.fedyogi import FedYogi

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        FedTrimmedAvg,
    )
}
DEFAULT_STRATEGY = FedAvg.name


def make_strategy(name: str, **params: Any) -> Strategy:
    """The strategy called ``name`` (case-insensitive) built with ``params``."""
    cls = STRATEGIES.get(str(name).lower())
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    try:
        return cls(**params)
    except TypeError as e:
        raise StrategyError(f"{cls.name}: bad parameters {sorted(params)}: {e}") from None


def strategy_from_config(config: Mapping[str, Any] | None) -> Strategy:
    """Build from ``{"name": ..., **params}`` (a run's ``config["strategy"]``)."""
    if config is None:
        return make_strategy(DEFAULT_STRATEGY)
    if not isinstance(config, Mapping):
        raise StrategyError(f"strategy config must be an object, got {type(config).__name__}")
    params = dict(config)
    name = params.pop("name", DEFAULT_STRATEGY)
    return make_strategy(name, **params)


__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "Accumulator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "MemoryCapExceeded",
    "PartialSum",
    "StackedUpdates",
    "State",
    "Strategy",
    "StrategyError",
    "WeightedMean",
    "Weights",
    "clip_by_norm",
    "coordinate_median",
    "global_norm",
    "make_strategy",
    "strategy_from_config",
    "trimmed_mean",
    "weighted_average",
]
