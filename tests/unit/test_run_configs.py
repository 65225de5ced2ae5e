"""A run's strategy and train configs have one source for what both need (FedProx's mu)."""

from __future__ import annotations

import pytest

from fedmq.wiring import run_configs
from learning.strategies import StrategyError


def test_fedprox_writes_its_mu_into_the_train_config_the_devices_get() -> None:
    strategy, train = run_configs({"name": "fedprox"}, {"epochs": 2})
    assert strategy == {"name": "fedprox", "proximal_mu": 0.01, "clip_norm": None}
    assert train == {"epochs": 2, "proximal_mu": 0.01}


def test_an_alias_that_agrees_is_folded_into_the_one_key() -> None:
    _, train = run_configs({"name": "fedprox", "proximal_mu": 0.3}, {"mu": 0.3})
    assert train == {"proximal_mu": 0.3}


@pytest.mark.parametrize("key", ["proximal_mu", "mu"])
def test_a_train_mu_that_disagrees_with_the_strategy_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="disagrees with strategy fedprox"):
        run_configs({"name": "fedprox", "proximal_mu": 0.3}, {key: 0.0})


def test_other_strategies_leave_the_train_config_as_it_is() -> None:
    strategy, train = run_configs(None, {"lr": 0.1})
    assert strategy["name"] == "fedavg" and train == {"lr": 0.1}
    with pytest.raises(StrategyError):
        run_configs({"name": "fedavg", "proximal_mu": 0.1}, {})
