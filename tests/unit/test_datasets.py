"""Datasets load locally, split the same way everywhere, and CIFAR-10 reads its real format."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from learning.data import cifar10, dataset_names, digits, load_dataset, mnist1d, synthetic


def test_digits_is_a_stratified_80_20_split_with_seed_0_scaled_to_unit_range() -> None:
    d = digits()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.min() >= 0.0 and d.x_train.max() == 1.0
    assert d.num_classes == 10 and d.input_shape == (64,)
    share = np.bincount(d.y_test) / np.bincount(np.concatenate([d.y_train, d.y_test]))
    assert np.allclose(share, 0.2, atol=0.01)  # stratified
    again = load_dataset("digits", seed=0)
    assert np.array_equal(again.x_test, d.x_test) and np.array_equal(again.y_test, d.y_test)


def test_mnist1d_is_generated_deterministically_balanced_and_learnable() -> None:
    d = mnist1d(num_samples=2000, seed=1)
    assert d.x_train.shape == (1600, 40) and d.x_test.shape == (400, 40)
    assert np.array_equal(d.x_train, mnist1d(num_samples=2000, seed=1).x_train)
    assert not np.array_equal(d.x_train, mnist1d(num_samples=2000, seed=2).x_train)
    assert np.bincount(d.y_test).tolist() == [40] * 10
    knn = KNeighborsClassifier(5).fit(d.x_train, d.y_train)
    assert knn.score(d.x_test, d.y_test) > 0.5  # chance is 0.1


def test_synthetic_blobs_have_the_configured_shape_and_are_separable() -> None:
    d = synthetic(num_samples=600, num_features=12, num_classes=3, separation=4.0, seed=3)
    assert d.input_shape == (12,) and d.num_classes == 3 and len(d.y_test) == 120
    assert LogisticRegression().fit(d.x_train, d.y_train).score(d.x_test, d.y_test) > 0.95


def test_the_registry_lists_the_four_datasets_and_refuses_unknown_names() -> None:
    assert dataset_names() == ["cifar10", "digits", "mnist1d", "synthetic"]
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("imagenet")


def _write_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """One batch exactly as the official python-format archive pickles it (protocol 2)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data, labels


def test_cifar10_reads_the_standard_python_batches_from_a_local_folder(tmp_path: Path) -> None:
    written = [_write_batch(tmp_path / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test_data, test_labels = _write_batch(tmp_path / "test_batch", 4, 9)
    d = cifar10(tmp_path, normalize=False)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.y_train.tolist() == [label for _, labels in written for label in labels]
    assert d.y_test.tolist() == test_labels
    # Channel-major planes: the first 1024 bytes of a row are the red 32x32 image.
    assert np.allclose(d.x_test[1, 0], test_data[1, :1024].reshape(32, 32) / 255.0)
    normed = load_dataset("cifar10", root=str(tmp_path))
    assert abs(float(normed.x_train[:, 0].mean()) - (0.5 - 0.4914) / 0.2470) < 0.2


def test_a_cifar10_folder_without_its_batches_names_the_missing_files(tmp_path: Path) -> None:
    _write_batch(tmp_path / "data_batch_1", 2, 1)
    _write_batch(tmp_path / "data_batch_2", 2, 2)
    _write_batch(tmp_path / "test_batch", 2, 3)
    with pytest.raises(FileNotFoundError, match="missing: data_batch_3, data_batch_4, data_b"):
        cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected the python-format batches"):
        cifar10(tmp_path / "absent")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_a_cifar10_batch_that_pickles_any_other_global_is_refused(tmp_path: Path) -> None:
    for i in range(1, 6):
        _write_batch(tmp_path / f"data_batch_{i}", 1, i)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        cifar10(tmp_path)
