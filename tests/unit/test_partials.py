"""Partial-sum blobs (``workers.partials``): exact round trips of float64 sums through the
codec, labels that keep a part in its own round, and how a round is cut into parts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from learning.strategies import PartialSum
from protocol.codec import CodecError, DecodeLimits, decode
from workers.fold import GlobalModel, UpdateRef
from workers.partials import (
    KIND,
    PartialBlobError,
    PartLabel,
    decode_partial,
    encode_partial,
    part_bounds,
    updates_digest,
)

LABEL = PartLabel("run-1", 3, 1, 4, "ab" * 32)


def _base() -> GlobalModel:
    rng = np.random.default_rng(0)
    return GlobalModel.from_tensors(
        {
            "w": rng.standard_normal((5, 7)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
            "scale": np.array(1.5, np.float32),
            "steps": np.array(9, np.int64),
        },
        "0",
    )


def _partial(base: GlobalModel) -> PartialSum:
    rng = np.random.default_rng(1)
    sums = {n: 1e3 * rng.standard_normal(a.shape) for n, a in base.floats.items()}
    sums["w"][0, 0] = -0.0  # every bit survives, the sign of zero too
    sums["w"][0, 1] = 5e-324  # and subnormals
    return PartialSum(sums, 1234.0 + 2.0**-30, 17)


def test_float64_sums_round_trip_bit_for_bit() -> None:
    base = _base()
    part = _partial(base)
    counters = {"steps": np.array(11, np.int64)}
    blob = encode_partial(part, counters, LABEL)
    got, got_counters = decode_partial(blob, base, LABEL, DecodeLimits())
    assert (got.count, got.total_weight) == (17, part.total_weight)  # float.hex: exact
    for name, value in part.sums.items():
        assert got.sums[name].dtype == np.float64 and got.sums[name].shape == value.shape
        assert got.sums[name].tobytes() == value.tobytes(), name
    assert got_counters == counters
    meta = decode(blob).metadata
    assert meta["kind"] == KIND and meta["run_id"] == "run-1" and meta["part"] == "1"
    assert encode_partial(part, counters, LABEL) == blob  # deterministic: content addressed


@pytest.mark.parametrize(
    "other",
    [
        PartLabel("run-2", 3, 1, 4, "ab" * 32),
        PartLabel("run-1", 4, 1, 4, "ab" * 32),
        PartLabel("run-1", 3, 2, 4, "ab" * 32),
        PartLabel("run-1", 3, 1, 5, "ab" * 32),
        PartLabel("run-1", 3, 1, 4, "cd" * 32),
    ],
)
def test_a_blob_is_only_read_as_the_part_it_says_it_is(other: PartLabel) -> None:
    base = _base()
    blob = encode_partial(_partial(base), {"steps": np.array(1, np.int64)}, LABEL)
    with pytest.raises(PartialBlobError, match="partial blob is not"):
        decode_partial(blob, base, other, DecodeLimits())


def test_blobs_that_are_not_this_models_partial_sums_are_refused() -> None:
    base = _base()
    other = GlobalModel.from_tensors({"w": np.zeros((5, 8), np.float32)}, "0")
    blob = encode_partial(_partial(base), {"steps": np.array(1, np.int64)}, LABEL)
    with pytest.raises(CodecError, match="does not match the expected model"):
        decode_partial(blob, other, LABEL, DecodeLimits())
    nan = _partial(base)
    nan.sums["b"][2] = np.nan
    bad = encode_partial(nan, {"steps": np.array(1, np.int64)}, LABEL)
    with pytest.raises(PartialBlobError, match="NaN or Inf"):
        decode_partial(bad, base, LABEL, DecodeLimits())
    with pytest.raises(ValueError, match="not float64"):
        encode_partial(PartialSum({"b": np.zeros(5, np.float32)}, 1.0, 1), {}, LABEL)


def test_a_partial_may_be_twice_the_models_size_limit() -> None:
    base = _base()
    blob = encode_partial(_partial(base), {"steps": np.array(1, np.int64)}, LABEL)
    fp32_bytes = sum(a.nbytes for a in base.floats.values()) + 8
    tight = DecodeLimits(max_decompressed_bytes=fp32_bytes + 64)  # the model fits, 2x not
    got, _ = decode_partial(blob, base, LABEL, tight)
    assert got.count == 17


@pytest.mark.parametrize("k", [1, 2, 7, 100, 257])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_parts_are_contiguous_disjoint_and_cover_the_round(k: int, parts: int) -> None:
    bounds = [part_bounds(k, parts, p) for p in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="does not exist"):
        part_bounds(k, parts, parts)


def test_the_digest_names_the_base_and_every_update_in_order() -> None:
    ups = [UpdateRef("a", "1" * 64, 5), UpdateRef("b", None, 7), UpdateRef("c", "2" * 64, 1)]
    d = updates_digest("f" * 64, ups)
    assert d == updates_digest("f" * 64, list(ups))
    assert d != updates_digest("e" * 64, ups)
    assert d != updates_digest("f" * 64, ups[::-1])
    assert d != updates_digest("f" * 64, [*ups[:2], UpdateRef("c", "2" * 64, 2)])
