"""Every partitioner is a seeded, disjoint cover of the indices, with its own kind of skew."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learning.data import PAPER_TABLE6, partition
from learning.data.partition import dirichlet, iid, quantity_skew, shards

KINDS: list[tuple[str, dict[str, Any]]] = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3, "min_size": 2}),
    ("shards", {"shards_per_client": 2}),
    ("quantity_skew", {}),
    ("quantity_skew", {"power": 3.0}),
]


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(40, 400),
    classes=st.integers(2, 10),
    clients=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(range(len(KINDS))),
)
def test_every_partition_is_a_disjoint_cover_of_the_indices(
    n: int, classes: int, clients: int, seed: int, kind: int
) -> None:
    name, cfg = KINDS[kind]
    labels = np.random.default_rng(seed).integers(0, classes, n)
    parts = partition(name, labels, clients, seed=seed, **cfg)
    assert len(parts) == clients
    _assert_disjoint_cover(parts, n)
    again = partition(name, labels, clients, seed=seed, **cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_parts_differ_in_size_by_at_most_one_and_change_with_the_seed() -> None:
    labels = np.zeros(103, dtype=np.int64)
    parts = iid(labels, 5, seed=0)
    assert {len(p) for p in parts} == {20, 21}
    assert not np.array_equal(parts[0], iid(labels, 5, seed=1)[0])


def test_dirichlet_with_a_small_alpha_skews_labels_and_keeps_the_minimum_size() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet(labels, 10, seed=0, alpha=0.1, min_size=20)
    assert min(len(p) for p in parts) >= 20
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # IID would be about 0.1
    wide = dirichlet(labels, 10, seed=0, alpha=1000.0)
    assert max(np.bincount(labels[p]).max() / len(p) for p in wide) < 0.2


def test_shards_give_each_client_at_most_its_number_of_labels() -> None:
    labels = np.repeat(np.arange(10), 60)
    parts = shards(labels, 5, seed=0, shards_per_client=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert {len(p) for p in parts} == {120}


def test_quantity_skew_follows_the_papers_table_6_or_a_power_law() -> None:
    labels = np.zeros(50_000, dtype=np.int64)
    for k, table in PAPER_TABLE6.items():
        sizes = [len(p) for p in quantity_skew(labels, k, proportions="paper")]
        expected = np.asarray(table) / sum(table) * 50_000
        assert np.all(np.abs(np.asarray(sizes) - expected) <= 2)
    sizes = sorted(len(p) for p in quantity_skew(labels[:1000], 4, power=1.0))
    assert sizes[-1] > 3 * sizes[0]
    with pytest.raises(ValueError, match="2, 3 or 5"):
        quantity_skew(labels, 4, proportions="paper")


def test_an_unknown_partition_or_too_few_samples_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown partition"):
        partition("pathological", np.zeros(10), 2)
    with pytest.raises(ValueError, match="cannot split 3 samples among 4 clients"):
        iid(np.zeros(3), 4)
