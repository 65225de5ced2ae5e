"""CIFAR-10 from a local folder in its standard "python version" format.

The folder (``cifar-10-batches-py`` as unpacked from the official archive) holds
``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: pickled dicts with ``b"data"`` (a
uint8 array, N x 3072, channel-major 32x32 planes) and ``b"labels"`` (a list of ints).
Nothing is downloaded; a missing folder or file is an error naming what is expected.

That format is pickle, and unpickling can run arbitrary code. These are files the user put
on the disk, never bytes from the network, and still they are read with a restricted
unpickler that resolves only the few globals a CIFAR batch needs: numpy's array
reconstruction (``_reconstruct``, ``ndarray``, ``dtype``, under numpy 1's ``numpy.core`` and
numpy 2's ``numpy._core`` names) and ``_codecs.encode``, which protocol-2 pickles written by
Python 3 use for ``bytes``. Any other global is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from learning.data.datasets import Dataset

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}: not allowed")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one CIFAR-10 python batch."""
    with path.open("rb") as f:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data N x 3072 and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def cifar10(root: str | Path = "data/cifar-10-batches-py", normalize: bool = True) -> Dataset:
    """CIFAR-10's 50,000 training and 10,000 test images, float32 (N, 3, 32, 32).

    Pixels are scaled to [0, 1] and, with ``normalize``, standardised per channel with the
    training set's usual mean and standard deviation.
    """
    folder = Path(root)
    expected = [*TRAIN_FILES, TEST_FILE]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {folder}: expected the python-format batches "
            f"{', '.join(expected)} (missing: {', '.join(missing)}); unpack "
            "cifar-10-python.tar.gz there. fedmq never downloads it."
        )
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    x_train, x_test = _scale(x_train, normalize), _scale(x_test, normalize)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def _scale(images: np.ndarray, normalize: bool) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    if normalize:
        x = (x - MEAN[:, None, None]) / STD[:, None, None]
    return x
