"""A plain single-process FedAvg replica of a federation: the reference for fedmq's math.

It runs what a federated run with the same config computes, with no bus, database or codec,
and returns the global model's test accuracy after every round. The benchmark checks
fedmq's per-round accuracy against it.

Seeding convention (the device SDK follows it too, so the two runs train identically):

- data: ``load_dataset(config.dataset, **config.dataset_args)``; the train/test split has its
  own seed among the dataset args (digits: stratified 80/20, seed 0). The server holds the
  test part.
- partition: ``partition(config.partition, y_train, config.clients, seed=config.seed,
  **config.partition_args)``; client k (0-based) holds ``parts[k]`` of the training part.
- initial global model: ``build_model(config.model, ..., seed=config.seed)``.
- client k in round r (1-based) runs ``train_local(..., seed=client_seed(config.seed, r, k))``
  starting from the round's global weights, with a fresh optimizer.
  ``client_seed`` hashes (seed, r, k) with numpy's ``SeedSequence``: stable across
  processes and platforms, unlike Python's ``hash``.
- aggregation: FedAvg over deltas, ``w ← w + Σ n_k/n · (w_k - w)`` summed in float64 and
  stored as float32 (what the worker's fold does); integer buffers take the maximum.
  Each client starts from the same global weights, so training order does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from learning.data import Dataset, Partition, load_dataset, partition
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import Arrays, is_float, load_numpy, to_numpy
from learning.train import train_local


@dataclass(frozen=True)
class ReplicaConfig:
    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"
    clients: int = 5
    rounds: int = 20
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0
    dataset_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    partition_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    round: int
    accuracy: float
    loss: float
    client_samples: list[int]


@dataclass
class ReplicaResult:
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds]


def client_seed(seed: int, round_number: int, client: int) -> int:
    """The training seed of client ``client`` (0-based) in round ``round_number`` (1-based)."""
    return derive_seed(seed, round_number, client)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from non-negative ints, via numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint32)[0])


def federation_data(config: ReplicaConfig) -> tuple[Dataset, Partition]:
    data = load_dataset(config.dataset, **config.dataset_args)
    parts = partition(
        config.partition, data.y_train, config.clients, seed=config.seed, **config.partition_args
    )
    return data, parts


def initial_model(config: ReplicaConfig, data: Dataset) -> nn.Module:
    return build_model(
        config.model,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=config.seed,
        **config.model_args,
    )


def fedavg(global_weights: Arrays, updates: Sequence[tuple[Arrays, int]]) -> Arrays:
    """``w + Σ n_k/n · (w_k - w)`` in float64, stored as float32; ints take the maximum."""
    total = float(sum(n for _, n in updates))
    out: Arrays = {}
    for name, w in global_weights.items():
        if is_float(w):
            acc = np.zeros(w.shape, np.float64)
            for weights, n in updates:
                acc += (n / total) * (weights[name].astype(np.float64) - w)
            out[name] = (w.astype(np.float64) + acc).astype(np.float32)
        else:
            out[name] = np.max(np.stack([u[name] for u, _ in updates]), axis=0)
    return out


def run_replica(
    config: ReplicaConfig, on_round: Callable[[RoundResult], None] | None = None
) -> ReplicaResult:
    data, parts = federation_data(config)
    model = initial_model(config, data)
    global_weights = to_numpy(model)
    result = ReplicaResult()
    for r in range(1, config.rounds + 1):
        updates: list[tuple[Arrays, int]] = []
        for k, idx in enumerate(parts):
            load_numpy(model, global_weights)
            train_local(
                model,
                data.x_train[idx],
                data.y_train[idx],
                epochs=config.local_epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                proximal_mu=config.proximal_mu,
                seed=client_seed(config.seed, r, k),
            )
            updates.append((to_numpy(model), len(idx)))
        global_weights = fedavg(global_weights, updates)
        load_numpy(model, global_weights)
        loss, acc = evaluate(model, data.x_test, data.y_test)
        done = RoundResult(r, acc, loss, [n for _, n in updates])
        result.rounds.append(done)
        if on_round is not None:
            on_round(done)
    return result


def run_centralized(config: ReplicaConfig, epochs: int) -> list[float]:
    """The baseline: the same initial model trained on all training data; accuracy per epoch.

    Epoch e (1-based) shuffles with ``derive_seed(config.seed, e)``.
    """
    data = load_dataset(config.dataset, **config.dataset_args)
    model = initial_model(config, data)
    accuracy = []
    for e in range(1, epochs + 1):
        train_local(
            model,
            data.x_train,
            data.y_train,
            epochs=1,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            seed=derive_seed(config.seed, e),
        )
        accuracy.append(evaluate(model, data.x_test, data.y_test)[1])
    return accuracy


__all__ = [
    "ReplicaConfig",
    "ReplicaResult",
    "RoundResult",
    "client_seed",
    "derive_seed",
    "fedavg",
    "federation_data",
    "initial_model",
    "run_centralized",
    "run_replica",
]
