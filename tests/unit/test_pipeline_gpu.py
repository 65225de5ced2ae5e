"""The CUDA folder against the CPU accumulator: run with ``pytest -m gpu`` on a machine
with a GPU (the marker is deselected by default, and every test here skips without CUDA).

CI has no GPU: the same folder's CPU path, the staging rotation and the device choice are
tested in test_pipeline_folder.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learning.strategies import WeightedMean, make_strategy
from protocol.codec import Encoding, encode
from workers.fold import GlobalModel, UpdateRef, fold_updates, make_folder
from workers.pipeline.device import DeviceUnavailable
from workers.pipeline.folder import TorchFolder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SHAPES = {"conv.weight": (256, 128, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,)}


def _updates(k: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
        for _ in range(k)
    ]


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == np.float64 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_the_cuda_folder_equals_the_cpu_accumulator_to_fp32_rounding() -> None:
    ups = _updates(6)
    weights = [10.0, 250.0, 37.0, 4.0, 99.0, 1.0]
    ref, dev = WeightedMean(), TorchFolder("cuda")
    for u, w in zip(ups, weights, strict=True):
        ref.add(u, w)
        dev.add(u, w)
    _close(dev.result(), ref.result())
    t = dev.timings
    assert t.updates == 6 and t.copy_s > 0 and t.compute_s > 0 and t.total_s > 0


def test_double_buffered_staging_stays_correct_over_many_updates() -> None:
    # Each update differs from the last in every element, and adds come back to back: a
    # staging buffer overwritten before its copy finished would show in the sum.
    rng = np.random.default_rng(1)
    ref, dev = WeightedMean(), TorchFolder("cuda")
    template = _updates(1, seed=2)[0]
    for k in range(120):
        u = {n: v * np.float32(1 + k % 7) + np.float32(k) for n, v in template.items()}
        w = float(rng.integers(1, 1000))
        ref.add(u, w)
        dev.add(u, w)
    _close(dev.result(), ref.result())
    assert dev.timings.updates == 120


def test_a_round_folded_on_the_gpu_matches_the_cpu_fold() -> None:
    rng = np.random.default_rng(3)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    blobs = {}
    for i in range(8):
        client = {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                  for n, v in base.items()}  # fmt: skip
        blobs[f"{i:064x}"] = encode(client, Encoding.BF16, base=base, base_version="0")
    model = GlobalModel.from_tensors(base, "0")
    refs = [UpdateRef(f"c{i}", sha, 5 + 13 * i) for i, sha in enumerate(blobs)]
    fedavg = make_strategy("fedavg")
    cpu = fold_updates(refs, blobs.__getitem__, model, fedavg, decode_ahead=2)
    folder = make_folder(fedavg, len(refs), "auto")
    assert isinstance(folder, TorchFolder)
    gpu = fold_updates(refs, blobs.__getitem__, model, fedavg, folder=folder, decode_ahead=2)
    assert gpu.folded == cpu.folded
    _close(gpu.delta, cpu.delta)


def test_a_cuda_index_past_the_last_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="numbered from 0"):
        make_folder(make_strategy("fedavg"), 2, f"cuda:{torch.cuda.device_count()}")
