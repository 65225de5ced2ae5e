"""Datasets by name: ``load_dataset("digits", seed=0)``; ``register_dataset`` adds more.

Keywords are the loader's own (``digits(seed, test_fraction)``, ``mnist1d(num_samples,
length, seed, test_fraction)``, ``synthetic(...)``, ``cifar10(root, normalize)``).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
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


# Loaders that are pure functions of their keywords (bundled or generated data): an
# embedded federation's 1,000 devices in one process load one of them once, not 1,000 times
# (scikit-learn's digits parse alone took 30 ms a device). Each caller gets its own copy.
_PURE = {"digits", "mnist1d", "synthetic"}
_CACHE: OrderedDict[str, Dataset] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def register_dataset(name: str, loader: Loader) -> None:
    _LOADERS[name] = loader
    _PURE.discard(name)


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def has_dataset(name: str) -> bool:
    return name in _LOADERS


def load_dataset(name: str, **cfg: Any) -> Dataset:
    loader = _LOADERS.get(name)
    if loader is None:
        raise KeyError(f"unknown dataset {name!r}; known: {dataset_names()}")
    if name not in _PURE:
        return loader(**cfg)
    key = f"{name}:{json.dumps(cfg, sort_keys=True, default=repr)}"
    with _CACHE_LOCK:
        data = _CACHE.get(key)
        if data is None:
            data = _CACHE[key] = loader(**cfg)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
    return _copy(data)


def _copy(data: Dataset) -> Dataset:
    return dataclasses.replace(
        data,
        x_train=data.x_train.copy(),
        y_train=data.y_train.copy(),
        x_test=data.x_test.copy(),
        y_test=data.y_test.copy(),
    )
