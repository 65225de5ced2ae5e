"""Fleet heterogeneity: who is slow or late is reproducible from the seed and as asked."""

from __future__ import annotations

import pytest

from devices.config import SimulatedBehaviour
from simulation.heterogeneity import Heterogeneity, cli_args


def test_homogeneous_by_default() -> None:
    h = Heterogeneity()
    assert not h.active
    assert h.behaviours(4, seed=0) == [SimulatedBehaviour()] * 4
    assert h.describe(4, 0) == "homogeneous devices"


def test_slow_and_late_devices_are_the_asked_counts_and_reproducible() -> None:
    h = Heterogeneity(
        slow_fraction=0.3, slowdown_s=2.0, dropout=0.1, late_joiners=2, join_delay_s=5
    )
    first = h.behaviours(10, seed=7)
    assert first == h.behaviours(10, seed=7)
    assert first != h.behaviours(10, seed=8)
    assert sum(b.slowdown_s == 2.0 for b in first) == 3  # ceil(0.3 * 10)
    assert sum(b.join_delay_s == 5 for b in first) == 2
    assert all(b.dropout == 0.1 for b in first)
    assert "late joiners" in h.describe(10, 7) and "dropout 0.1" in h.describe(10, 7)


def test_a_fleet_of_late_joiners_only_is_refused() -> None:
    with pytest.raises(ValueError, match="late joiners"):
        Heterogeneity(late_joiners=3, join_delay_s=1).behaviours(3, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"slow_fraction": 1.5}, {"dropout": 1.0}, {"late_joiners": -1}, {"slowdown_s": -1}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Heterogeneity(**kwargs)  # type: ignore[arg-type]


def test_behaviour_becomes_device_command_flags() -> None:
    args = cli_args(SimulatedBehaviour(slowdown_s=1.5, dropout=0.2, join_delay_s=3, outage_s=4))
    assert args == [
        *("--slowdown", "1.5", "--dropout", "0.2"),
        *("--join-delay", "3", "--outage", "4"),
    ]


def test_simulated_behaviour_checks_its_ranges() -> None:
    with pytest.raises(ValueError, match="dropout"):
        SimulatedBehaviour(dropout=1.0)
    with pytest.raises(ValueError, match="slowdown"):
        SimulatedBehaviour(slowdown_s=-1)
