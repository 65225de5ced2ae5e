"""Streaming FedAvg folds 50 updates in memory bounded by a small multiple of one model.

tracemalloc sees numpy's allocations (numpy reports its data buffers to it), so the
peak it measures while folding is the fold's working set: the float64 sum, one decoded
update and the decoder's buffers. The 50 blobs themselves are encoded before tracing
starts, so they count as input, not as the fold's memory.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from learning.strategies import make_strategy
from protocol.codec import Encoding, decode, encode
from workers.fold import FoldResult, GlobalModel, UpdateRef, fold_updates

SHAPES = {"big.weight": (512, 512), "mid.weight": (128, 256), "mid.bias": (256,)}
BASE_VERSION = "0"


def _base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["bn.num_batches_tracked"] = np.array(10, dtype=np.int64)
    return tensors


def _blobs(base: dict[str, np.ndarray], k: int) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    blobs = {}
    for i in range(k):
        client = {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for n, v in
                  base.items() if v.dtype == np.float32}  # fmt: skip
        client["bn.num_batches_tracked"] = np.array(10 + i, dtype=np.int64)
        blobs[f"{i:064x}"] = encode(client, Encoding.BF16, base=base, base_version=BASE_VERSION)
    return blobs


def _fold_peak(base: dict[str, np.ndarray], blobs: dict[str, bytes]) -> tuple[int, FoldResult]:
    model = GlobalModel.from_tensors(base, BASE_VERSION)
    refs = [UpdateRef(f"c{i}", sha, 10 + i) for i, sha in enumerate(blobs)]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fold_updates(refs, blobs.__getitem__, model, make_strategy("fedavg"))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    return _base()


def test_streaming_fedavg_over_50_updates_uses_a_small_multiple_of_one_model(
    base: dict[str, np.ndarray],
) -> None:
    model_bytes = sum(v.nbytes for v in base.values() if v.dtype == np.float32)
    blobs = _blobs(base, 50)
    peak, result = _fold_peak(base, blobs)
    assert len(result.folded) == 50
    # float64 sum (2x) + one decoded update with its decoder buffers (~1.9x) + a fixed
    # 512 KiB scratch; holding the 50 updates at once would be 50x.
    assert peak < 5 * model_bytes, f"peak {peak / model_bytes:.2f}x the model"


def test_fold_memory_does_not_grow_with_the_number_of_updates(
    base: dict[str, np.ndarray],
) -> None:
    peak_10, _ = _fold_peak(base, _blobs(base, 10))
    peak_50, _ = _fold_peak(base, _blobs(base, 50))
    assert peak_50 < 1.2 * peak_10 + 64 * 1024


def test_folded_result_is_the_weighted_mean_of_the_decoded_deltas(
    base: dict[str, np.ndarray],
) -> None:
    blobs = _blobs(base, 6)
    _, result = _fold_peak(base, blobs)
    deltas = [decode(b).tensors for b in blobs.values()]
    counts = np.array([10 + i for i in range(6)], dtype=np.float64)
    for name in SHAPES:
        want = sum(c * d[name].astype(np.float64) for c, d in zip(counts, deltas, strict=True))
        np.testing.assert_allclose(result.delta[name], want / counts.sum(), rtol=1e-12)
    assert result.counters["bn.num_batches_tracked"] == 15


def test_full_weight_updates_fold_like_deltas_and_foreign_deltas_are_skipped(
    base: dict[str, np.ndarray],
) -> None:
    rng = np.random.default_rng(3)
    floats = {n: v for n, v in base.items() if v.dtype == np.float32}
    clients = [{n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                for n, v in floats.items()} for _ in range(3)]  # fmt: skip
    for c in clients:
        c["bn.num_batches_tracked"] = base["bn.num_batches_tracked"]
    as_deltas = {f"{i:064x}": encode(c, Encoding.FP32, base=base, base_version=BASE_VERSION)
                 for i, c in enumerate(clients)}  # fmt: skip
    as_weights = {f"{i:064x}": encode(c, Encoding.FP32) for i, c in enumerate(clients)}
    model = GlobalModel.from_tensors(base, BASE_VERSION)
    refs = [UpdateRef(f"c{i}", sha, 1 + i) for i, sha in enumerate(as_deltas)]
    fedavg = make_strategy("fedavg")
    a = fold_updates(refs, as_deltas.__getitem__, model, fedavg)
    b = fold_updates(refs, as_weights.__getitem__, model, fedavg)
    for name in SHAPES:
        np.testing.assert_allclose(a.delta[name], b.delta[name], rtol=1e-5, atol=1e-7)

    foreign = encode(clients[0], Encoding.BF16, base=base, base_version="7")
    blobs = {"f" * 64: foreign, **as_deltas}
    refs = [UpdateRef("stale", "f" * 64, 5), UpdateRef("gone", None, 5), *refs]
    result = fold_updates(refs, blobs.__getitem__, model, fedavg)
    assert result.folded == ["c0", "c1", "c2"]
    assert "delta against model '7'" in result.skipped["stale"]
    assert "deleted" in result.skipped["gone"]
