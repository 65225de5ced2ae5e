"""Partitioners: pure functions of (labels, number of clients, seed) -> index arrays.

Each returns ``num_clients`` sorted int64 index arrays that are disjoint and together cover
``range(len(labels))`` exactly. Client k gets ``parts[k]``; the same arguments give the same
partition in every process.

- ``iid``: a seeded shuffle cut into near-equal parts.
- ``dirichlet``: per class, proportions ~ Dir(alpha·1) over clients (Hsu et al., 2019); resampled
  until every client has at least ``min_size`` samples.
- ``shards``: labels sorted and cut into ``num_clients · shards_per_client`` shards, each
  client gets ``shards_per_client`` of them (McMahan et al., 2017).
- ``quantity_skew``: IID in labels, skewed in size: proportions ∝ a power law, or
  ``proportions="paper"``, the client sizes of Table 6 of the REST dynamic-FL paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Partition = list[np.ndarray]

# Table 6 (non-IID) of "A Development of Dynamic Federated Learning Platform based on
# RESTful API through Model Lightweighting": training samples per client on CIFAR-10.
PAPER_TABLE6: dict[int, tuple[int, ...]] = {
    2: (42_754, 7_245),
    3: (19_067, 23_281, 7_651),
    5: (9_695, 18_545, 3_712, 12_339, 5_706),
}


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1 or n < num_clients:
        raise ValueError(f"cannot split {n} samples among {num_clients} clients")


def _cut(order: np.ndarray, sizes: Sequence[int]) -> Partition:
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(order, bounds)]


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> Partition:
    n = len(labels)
    _check(n, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int = 10,
    max_tries: int = 1000,
) -> Partition:
    """Label-skewed parts; ``min_size`` is lowered to n // num_clients if it cannot be met."""
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    min_size = min(min_size, len(labels) // num_clients)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    msg = f"no Dirichlet({alpha}) partition with {min_size} per client in {max_tries} tries"
    raise ValueError(msg)


def shards(
    labels: np.ndarray, num_clients: int, seed: int = 0, shards_per_client: int = 2
) -> Partition:
    labels = np.asarray(labels)
    n_shards = num_clients * shards_per_client
    _check(len(labels), n_shards)
    rng = np.random.default_rng(seed)
    # Sort by label, ties broken randomly, so that shards are label-pure where possible.
    order = np.lexsort((rng.permutation(len(labels)), labels))
    pieces = np.array_split(order, n_shards)
    owner = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([pieces[s] for s in owner[k::num_clients]])).astype(np.int64)
        for k in range(num_clients)
    ]


def quantity_skew(
    labels: np.ndarray,
    num_clients: int,
    seed: int = 0,
    power: float = 1.5,
    proportions: str | Sequence[float] | None = None,
) -> Partition:
    """Sizes ∝ ``proportions`` ("paper": Table 6, for 2, 3 or 5 clients) or ∝ 1/(k+1)^power.

    Every client gets at least one sample; the order of sizes over clients is as given
    (the power law's is shuffled with the seed).
    """
    n = len(labels)
    _check(n, num_clients)
    rng = np.random.default_rng(seed)
    if proportions == "paper":
        if num_clients not in PAPER_TABLE6:
            raise ValueError(f"Table 6 has 2, 3 or 5 clients, not {num_clients}")
        weights = np.asarray(PAPER_TABLE6[num_clients], dtype=np.float64)
    elif proportions is not None and not isinstance(proportions, str):
        weights = np.asarray(proportions, dtype=np.float64)
        if len(weights) != num_clients or np.any(weights <= 0):
            raise ValueError("proportions: one positive weight per client")
    elif proportions is None:
        weights = rng.permutation(1.0 / np.arange(1, num_clients + 1) ** power)
    else:
        raise ValueError(f"unknown proportions {proportions!r}")
    sizes = 1 + np.floor(weights / weights.sum() * (n - num_clients)).astype(np.int64)
    sizes[np.argmax(weights)] += n - sizes.sum()
    return _cut(rng.permutation(n), sizes.tolist())


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def partition(
    name: str, labels: np.ndarray, num_clients: int, seed: int = 0, **cfg: Any
) -> Partition:
    """``partition("dirichlet", y, 10, seed=0, alpha=0.5)``: a partitioner by name."""
    fn = PARTITIONERS.get(name)
    if fn is None:
        raise KeyError(f"unknown partition {name!r}; known: {sorted(PARTITIONERS)}")
    return fn(labels, num_clients, seed, **cfg)
