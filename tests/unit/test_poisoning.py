"""Poisoned updates on digits: one client of ten sends its honest delta scaled up or sign-
flipped. FedAvg visibly loses accuracy; FedMedian, FedTrimmedAvg and norm-clipped FedAvg stay
within 2 points of what the same strategy reaches with no attacker.

In-process (learning.replica's data, model and training; the strategies' own accumulate and
step, as the worker's fold calls them), so it is fast and needs no service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import numpy as np
import pytest
import torch

from learning.evaluate import evaluate
from learning.params import Arrays, load_numpy, to_numpy
from learning.replica import ReplicaConfig, client_seed, federation_data, initial_model
from learning.strategies import Strategy, make_strategy
from learning.train import train_local

CONFIG = ReplicaConfig(dataset="digits", model="mlp", clients=10, rounds=10, lr=0.05)
Attack = Callable[[Arrays], Arrays]
ATTACKS: dict[str, Attack] = {
    "none": lambda d: d,
    "sign-flipped x10": lambda d: {k: -10.0 * v for k, v in d.items()},
    "scaled x25": lambda d: {k: 25.0 * v for k, v in d.items()},
}
CLIP = 0.4  # just above the largest honest delta (global norm 0.34; the first test checks)
ROBUST = {
    "fedmedian": lambda: make_strategy("fedmedian"),
    "fedtrimmedavg": lambda: make_strategy("fedtrimmedavg", beta=0.2),
    "fedavg+clip": lambda: make_strategy("fedavg", clip_norm=CLIP),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models train ~20x faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def _data():  # type: ignore[no-untyped-def]
    return federation_data(CONFIG)


def _federate(strategy: Callable[[], Strategy], attack: str) -> tuple[float, float]:
    """Final test accuracy, and the largest honest delta norm seen."""
    data, parts = _data()
    model = initial_model(CONFIG, data)
    weights = to_numpy(model)
    state: dict[str, np.ndarray] = {}
    biggest = 0.0
    s = strategy()
    for r in range(1, CONFIG.rounds + 1):
        acc = s.accumulator(len(parts))
        for k, idx in enumerate(parts):
            load_numpy(model, weights)
            train_local(
                model,
                data.x_train[idx],
                data.y_train[idx],
                epochs=CONFIG.local_epochs,
                batch_size=CONFIG.batch_size,
                lr=CONFIG.lr,
                momentum=CONFIG.momentum,
                seed=client_seed(CONFIG.seed, r, k),
            )
            trained = to_numpy(model)
            delta = {n: (trained[n] - weights[n]).astype(np.float32) for n in weights}
            if k == 0:
                delta = ATTACKS[attack](delta)
            else:
                biggest = max(biggest, float(np.sqrt(sum((v**2).sum() for v in delta.values()))))
            prepared, _ = s.prepare(delta)
            acc.add(prepared, len(idx))
        weights, state = s.step(weights, acc.result(), state)
    load_numpy(model, weights)
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    return 100.0 * accuracy, biggest


@cache
def _accuracy(name: str, attack: str) -> float:
    if name == "fedavg+clip" and attack == "none":
        name = "fedavg"  # the same run: no honest update reaches the clip norm (tested)
    make = ROBUST.get(name) or (lambda: make_strategy("fedavg"))
    return _federate(make, attack)[0]


def test_the_clip_norm_is_above_honest_updates() -> None:
    _, biggest = _federate(lambda: make_strategy("fedavg"), "none")
    assert biggest < CLIP, f"honest deltas reach {biggest:.2f}: clipping would hurt them too"


@pytest.mark.parametrize("attack", ["sign-flipped x10", "scaled x25"])
def test_fedavg_visibly_loses_accuracy_to_one_poisoned_client(attack: str) -> None:
    clean, poisoned = _accuracy("fedavg", "none"), _accuracy("fedavg", attack)
    assert clean > 80, clean
    assert poisoned < clean - 10, (clean, poisoned)


@pytest.mark.parametrize("attack", ["sign-flipped x10", "scaled x25"])
@pytest.mark.parametrize("name", list(ROBUST))
def test_robust_aggregation_keeps_accuracy_within_two_points(name: str, attack: str) -> None:
    clean, poisoned = _accuracy(name, "none"), _accuracy(name, attack)
    assert clean > 80, (name, clean)
    assert abs(poisoned - clean) <= 2.0, (name, attack, clean, poisoned)
