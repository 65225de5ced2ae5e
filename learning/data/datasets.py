"""In-memory datasets: ``digits``, ``mnist1d`` and ``synthetic`` (CIFAR-10 is in ``cifar.py``).

Every loader returns a ``Dataset``: float32 inputs, int64 labels, a train and a test part.
Splits are stratified and seeded (scikit-learn's ``train_test_split(stratify=y,
random_state=seed)``), so the same ``seed`` gives the same split in every process: the
server's test set and the devices' training data never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split(
    name: str, x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float, seed: int
) -> Dataset:
    """A stratified, seeded train/test ``Dataset`` of (x, y)."""
    from sklearn.model_selection import train_test_split  # imported late: it is slow to load

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return Dataset(
        name,
        x_tr.astype(np.float32),
        y_tr.astype(np.int64),
        x_te.astype(np.float32),
        y_te.astype(np.int64),
        num_classes,
    )


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), pixels / 16 in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return split("digits", x / 16.0, y, 10, test_fraction, seed)


def synthetic(
    num_samples: int = 1000,
    num_features: int = 20,
    num_classes: int = 4,
    separation: float = 3.0,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Gaussian blobs: one unit-variance blob per class around a random centre.

    Centres are drawn from N(0, separation²/num_features · I), so their distance is about
    ``separation · √2`` standard deviations whatever the dimension; larger is easier.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, num_features)) * separation / np.sqrt(2)
    y = np.arange(num_samples) % num_classes
    x = centres[y] + rng.standard_normal((num_samples, num_features))
    return split("synthetic", x, y, num_classes, test_fraction, seed)


# MNIST-1D's ten 12-point templates (Greydanus, "Scaling down deep learning", 2020).
_TEMPLATES = (
    np.array(
        [
            [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
            [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
            [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
            [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
            [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
            [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
            [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
            [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
        ]
    )
    - 5.0
)


def _smooth(noise: np.ndarray, width: float) -> np.ndarray:
    k = np.arange(-6, 7)
    kernel = np.exp(-0.5 * (k / width) ** 2)
    kernel /= kernel.sum()
    return np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, noise)


def mnist1d(
    num_samples: int = 4000, length: int = 40, seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """MNIST-1D, generated locally: 1-D signals of ``length`` points, ten classes.

    After Greydanus (2020). Each sample takes its class's 12-point template and
    1. pads it with zeros to a random total length in [36, 60) (random left/right margins),
    2. stretches it in amplitude by a factor in [0.75, 1.25],
    3. shears it: adds a random linear ramp (slope in [-0.75, 0.75] over the signal),
    4. resamples it to ``length`` points by linear interpolation and rolls it by a random
       shift of up to ``length // 8`` points,
    5. adds correlated noise (Gaussian-smoothed, scale 0.25) and white noise (scale 0.02).
    Classes are balanced; the same seed gives the same data. No download.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(num_samples) % 10
    rng.shuffle(y)
    grid = np.linspace(0.0, 1.0, length)
    x = np.empty((num_samples, length))
    for i, label in enumerate(y):
        total = int(rng.integers(36, 60))
        left = int(rng.integers(0, total - 12 + 1))
        signal = np.zeros(total)
        signal[left : left + 12] = _TEMPLATES[label] * rng.uniform(0.75, 1.25)
        signal += rng.uniform(-0.75, 0.75) * np.linspace(-0.5, 0.5, total)
        x[i] = np.interp(grid, np.linspace(0.0, 1.0, total), signal)
        x[i] = np.roll(x[i], int(rng.integers(-length // 8, length // 8 + 1)))
    x += 0.25 * _smooth(rng.standard_normal(x.shape), 2.0) + 0.02 * rng.standard_normal(x.shape)
    return split("mnist1d", x, y, 10, test_fraction, seed)
