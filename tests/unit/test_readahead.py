"""Decode-ahead (``workers.pipeline.readahead``): same result, errors reach the caller,
the thread never outlives its consumer, memory stays O(model)."""

from __future__ import annotations

import itertools
import threading
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from learning.strategies import StrategyError, make_strategy
from protocol.codec import Encoding, encode
from workers.fold import FoldResult, GlobalModel, UpdateRef, fold_updates
from workers.pipeline.readahead import read_ahead

SHAPES = {"conv.weight": (128, 64, 3, 3), "fc.weight": (512, 512), "fc.bias": (512,)}
BASE_VERSION = "0"


def _threads(name: str = "decode-ahead") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def _base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors["bn.num_batches_tracked"] = np.array(3, dtype=np.int64)
    return tensors


def _blobs(base: dict[str, np.ndarray], k: int, seed: int = 1) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    blobs = {}
    for i in range(k):
        client = {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                  for n, v in base.items() if v.dtype == np.float32}  # fmt: skip
        client["bn.num_batches_tracked"] = np.array(3 + i, dtype=np.int64)
        blobs[f"{i:064x}"] = encode(client, Encoding.BF16, base=base, base_version=BASE_VERSION)
    return blobs


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    return _base()


def _fold(
    base: dict[str, np.ndarray], blobs: dict[str, bytes], ahead: int, counts: list[int]
) -> FoldResult:
    model = GlobalModel.from_tensors(base, BASE_VERSION)
    refs = [
        UpdateRef(f"c{i}", sha, n) for i, (sha, n) in enumerate(zip(blobs, counts, strict=True))
    ]
    return fold_updates(refs, blobs.__getitem__, model, make_strategy("fedavg"), decode_ahead=ahead)


def test_decode_ahead_gives_the_plain_fold_bit_for_bit(base: dict[str, np.ndarray]) -> None:
    blobs = _blobs(base, 12)
    counts = [int(n) for n in np.random.default_rng(5).integers(1, 5000, size=12)]
    plain = _fold(base, blobs, 0, counts)
    ahead = _fold(base, blobs, 2, counts)
    assert ahead.folded == plain.folded and ahead.num_samples == plain.num_samples == sum(counts)
    for name in SHAPES:
        assert ahead.delta[name].dtype == np.float64
        assert np.array_equal(ahead.delta[name], plain.delta[name])
    assert ahead.counters["bn.num_batches_tracked"] == 14
    assert not _threads()


def test_a_corrupt_blob_is_still_reported_as_skipped(base: dict[str, np.ndarray]) -> None:
    blobs = _blobs(base, 3)
    blobs["e" * 64] = b"\x28\xb5\x2f\xfd not really zstd"
    result = _fold(base, blobs, 2, [10, 20, 30, 40])
    assert result.folded == ["c0", "c1", "c2"]
    assert "unusable update blob" in result.skipped["c3"]

    only_bad = {"e" * 64: blobs["e" * 64]}
    with pytest.raises(StrategyError, match="no usable update"):
        _fold(base, only_bad, 2, [10])
    assert not _threads()


def test_an_exception_in_the_producer_reaches_the_caller_and_the_thread_ends(
    base: dict[str, np.ndarray],
) -> None:
    blobs = _blobs(base, 4)
    names = list(blobs)

    def load(sha: str) -> bytes:
        if sha == names[2]:
            raise OSError("disk on fire")  # not a codec error: it must not be swallowed
        return blobs[sha]

    model = GlobalModel.from_tensors(base, BASE_VERSION)
    refs = [UpdateRef(f"c{i}", sha, 10) for i, sha in enumerate(names)]
    with pytest.raises(OSError, match="disk on fire"):
        fold_updates(refs, load, model, make_strategy("fedavg"), decode_ahead=2)
    assert not _threads()


def test_the_producer_error_arrives_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("boom")

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for x in read_ahead(source(), name="ra-error"):
            got.append(x)
    assert got == [1, 2]
    assert not _threads("ra-error")


def test_stopping_early_stops_the_thread_and_closes_the_source() -> None:
    produced = []
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            for i in itertools.count():
                produced.append(i)
                yield i
        finally:
            closed.set()

    for x in read_ahead(source(), depth=2, name="ra-early"):
        if x == 3:
            break
    assert not _threads("ra-early")
    assert closed.is_set()
    assert len(produced) <= 4 + 2  # the four taken, at most two ahead

    ahead = read_ahead(source(), name="ra-never")
    ahead.close()  # never started: no thread at all
    assert not _threads("ra-never")


def test_the_producer_stays_at_most_depth_items_ahead() -> None:
    produced = 0
    lead = []

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(30):
            produced += 1
            yield i

    for i, x in enumerate(read_ahead(source(), depth=2, name="ra-depth")):
        assert x == i
        time.sleep(0.002)  # a slow consumer: the producer runs up to its limit
        lead.append(produced - (i + 1))
    assert max(lead) == 2
    with pytest.raises(ValueError):
        next(read_ahead(iter([1]), depth=0))


def _peak(base: dict[str, np.ndarray], blobs: dict[str, bytes]) -> tuple[int, FoldResult]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = _fold(base, blobs, 2, [10 + i for i in range(len(blobs))])
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak, result


def test_decode_ahead_over_50_updates_uses_a_small_multiple_of_one_model(
    base: dict[str, np.ndarray],
) -> None:
    model_bytes = sum(v.nbytes for v in base.values() if v.dtype == np.float32)
    # float64 sum (2x) + at most three decoded updates (3x: one folding, two ahead) + one
    # decoder's buffers (~0.9x) + the fold's 512 KiB scratch (0.4x): about 6.3x, whatever
    # the number of updates. How much of that is reached depends on thread scheduling, so
    # both runs are held to the same bound rather than compared with each other; holding
    # the 50 updates would be 50x.
    for k in (10, 50):
        peak, result = _peak(base, _blobs(base, k))
        assert len(result.folded) == k
        assert peak < 7 * model_bytes, f"K={k}: peak {peak / model_bytes:.2f}x the model"
