"""``codec.validate`` refuses exactly what ``decode`` refuses, with the same reason.

The orchestrator's ingest validates updates with it (it stores them, it does not need the
tensors), and its NaN/Inf check reads the exponent bits of the stored bytes instead of
decoding: so every float encoding, shuffled or not, is checked here with NaN, both
infinities and the largest finite values planted at random places, and with the fuzz's
mutations of valid blobs.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode, spec_of, validate
from tests.unit.test_codec_corpus import rebuilt, split
from tests.unit.test_codec_fuzz import FUZZ, LIMITS, SEEDS

FLOATS = [Encoding.FP32, Encoding.BF16, Encoding.FP16]
# Bit patterns planted into one element (little-endian, per encoding).
SPECIAL = {
    Encoding.FP32: {
        "nan": 0x7FC00000,
        "-nan": 0xFFC00001,
        "inf": 0x7F800000,
        "-inf": 0xFF800000,
        "max": 0x7F7FFFFF,
        "-max": 0xFF7FFFFF,
        "exp 0xFE, low mantissa": 0x7F000001,
        "subnormal": 0x00000001,
    },
    Encoding.BF16: {
        "nan": 0x7FC0,
        "-nan": 0xFFC1,
        "inf": 0x7F80,
        "-inf": 0xFF80,
        "max": 0x7F7F,
        "-max": 0xFF7F,
        "subnormal": 0x0001,
    },
    Encoding.FP16: {
        "nan": 0x7E00,
        "inf": 0x7C00,
        "-inf": 0xFC00,
        "max": 0x7BFF,
        "-max": 0xFBFF,
        "subnormal": 0x0001,
    },
}


def _outcome(fn: object, blob: bytes) -> str | None:
    try:
        fn(blob, limits=LIMITS)  # type: ignore[operator]
    except CodecError as e:
        return str(e)
    return None


def _plant(blob: bytes, name: str, index: int, pattern: int, itemsize: int) -> bytes:
    """``blob`` with element ``index`` of tensor ``name`` set to ``pattern``, where its
    bytes lie (byte planes when the record is shuffled)."""
    header, _ = split(blob)
    rec = next(r for r in header["tensors"] if r["name"] == name)
    n = math.prod(rec["shape"])
    value = pattern.to_bytes(itemsize, "little")

    def edit(payload: bytearray) -> None:
        for j in range(itemsize):
            at = j * n + index if rec["shuffle"] else index * itemsize + j
            payload[rec["offset"] + at] = value[j]

    return rebuilt(blob, None, edit)


@pytest.mark.parametrize("encoding", FLOATS)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("size", [1, 7, 4096])
def test_planted_values(encoding: Encoding, shuffle: bool, size: int) -> None:
    rng = np.random.default_rng(size)
    blob = encode(
        {"w": rng.normal(0, 1, size).astype(np.float32), "n": np.arange(3)},
        encoding,
        shuffle=shuffle,
    )
    itemsize = 4 if encoding == Encoding.FP32 else 2
    assert _outcome(validate, blob) is None
    for label, pattern in SPECIAL[encoding].items():
        for index in {0, size - 1, int(rng.integers(size))}:
            planted = _plant(blob, "w", index, pattern, itemsize)
            want = _outcome(decode, planted)
            assert _outcome(validate, planted) == want, (label, index)
            assert (want is not None) == ("nan" in label or "inf" in label), (label, want)


@given(data=st.data())
@FUZZ
def test_agrees_with_decode_on_mutations(data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    assert _outcome(validate, bytes(blob)) == _outcome(decode, bytes(blob))


@given(data=st.data())
@FUZZ
def test_agrees_with_decode_on_payload_mutations(data: st.DataObject) -> None:
    """Mutations behind the zstd checksum (re-framed), where the NaN check is reached."""
    seed = data.draw(st.sampled_from(SEEDS[:3]))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))

    def edit(payload: bytearray) -> None:
        for at, value in flips:
            if payload:
                payload[at % len(payload)] = value

    blob = rebuilt(seed, None, edit)
    assert _outcome(validate, blob) == _outcome(decode, blob)


def test_expected_spec_and_limits_as_decode() -> None:
    blob = encode({"w": np.ones((2, 3), np.float32)}, Encoding.FP32)
    spec = decode(blob).tensors
    validate(blob, expected=spec_of(spec))
    with pytest.raises(CodecError, match="expected model"):
        validate(blob, expected=spec_of({"w": np.ones((3, 2), np.float32)}))
    with contextlib.suppress(CodecError):
        decode(blob, limits=DecodeLimits(max_decompressed_bytes=8))
    with pytest.raises(CodecError):
        validate(blob, limits=DecodeLimits(max_decompressed_bytes=8))
