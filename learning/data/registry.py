"""Datasets by name: ``load_dataset("digits", seed=0)``; ``register_dataset`` adds more.

Keywords are the loader's own (``digits(seed, test_fraction)``, ``mnist1d(num_samples,
length, seed, test_fraction)``, ``synthetic(...)``, ``cifar10(root, normalize)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from learning.data.cifar import cifar10
from learning.data.datasets import Dataset, digits, mnist1d, synthetic

Loader = Callable[..., Dataset]

_LOADERS: dict[str, Loader] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "synthetic": synthetic,
    "cifar10": cifar10,
}


def register_dataset(name: str, loader: Loader) -> None:
    _LOADERS[name] = loader


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def has_dataset(name: str) -> bool:
    return name in _LOADERS


def load_dataset(name: str, **cfg: Any) -> Dataset:
    loader = _LOADERS.get(name)
    if loader is None:
        raise KeyError(f"unknown dataset {name!r}; known: {dataset_names()}")
    return loader(**cfg)
