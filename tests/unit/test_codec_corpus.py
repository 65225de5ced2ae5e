"""A corpus of broken and hostile blobs: each one is refused with CodecError, quickly and
without allocating what it claims.

Blobs are built here by hand from the documented layout
(b"FMQT" | u8 version | u32 header length | u32 CRC-32 | JSON header | zstd frame), so these
tests also pin the wire format down.
"""

from __future__ import annotations

import copy
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zstandard

from protocol.codec import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    DecodeLimits,
    Encoding,
    TensorSpec,
    decode,
    encode,
    peek_header,
    spec_of,
)

GiB = 1 << 30
SMALL = {
    "w": (np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
    "b": np.array([0.5, -0.25, 2.0], np.float32),
    "n": np.array(3, np.int64),
}
# fp32 without shuffle: w at 0 (48 bytes), b at 48 (12), padding 60..63, n at 64 (8).
SMALL_BLOB = encode(SMALL, Encoding.FP32, shuffle=False, metadata={"run": "r1"})


def frame(payload: bytes, *, content_size: bool = True, checksum: bool = True) -> bytes:
    cctx = zstandard.ZstdCompressor(
        level=1, write_checksum=checksum, write_content_size=content_size
    )
    if content_size:
        return cctx.compress(payload)
    obj = cctx.compressobj()  # streaming without a size: the frame omits its content size
    return obj.compress(payload) + obj.flush()


def pack(
    header: dict[str, Any] | bytes,
    body: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    head_len: int | None = None,
    crc: int | None = None,
) -> bytes:
    head = (
        header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    )
    n = len(head) if head_len is None else head_len
    c = zlib.crc32(head) if crc is None else crc
    return struct.pack("<4sBII", magic, version, n, c) + head + body


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Header dict and decompressed payload of a valid blob."""
    (n,) = struct.unpack_from("<I", blob, 5)
    body = zstandard.ZstdDecompressor().decompress(blob[13 + n :])
    return json.loads(blob[13 : 13 + n]), body


def rebuilt(
    blob: bytes,
    edit_header: Callable[[dict[str, Any]], None] | None = None,
    edit_payload: Callable[[bytearray], None] | None = None,
) -> bytes:
    header, payload = split(blob)
    header = copy.deepcopy(header)
    data = bytearray(payload)
    if edit_header:
        edit_header(header)
    if edit_payload:
        edit_payload(data)
    return pack(header, frame(bytes(data)))


def assert_refused(
    blob: Any,
    match: str | None = None,
    *,
    limits: DecodeLimits | None = None,
    expected: dict[str, TensorSpec] | None = None,
) -> None:
    start = time.perf_counter()
    with pytest.raises(CodecError, match=match):
        decode(blob, limits=limits or DecodeLimits(), expected=expected)
    assert time.perf_counter() - start < 1.0


def peak_memory(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    except CodecError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_blob_built_by_hand_from_the_documented_layout_is_byte_identical() -> None:
    header, payload = split(SMALL_BLOB)
    assert pack(header, frame(payload)) == SMALL_BLOB
    assert payload[:48] == SMALL["w"].astype("<f4").tobytes()
    assert payload[60:64] == bytes(4)  # alignment padding before the int64


def test_every_truncation_of_a_blob_is_refused() -> None:
    for n in range(len(SMALL_BLOB)):
        assert_refused(SMALL_BLOB[:n])


def test_flipped_bytes_are_refused_or_change_nothing() -> None:
    original = decode(SMALL_BLOB)
    refused = 0
    flips = [(i, bit) for i in range(len(SMALL_BLOB)) for bit in (0x01, 0x10, 0x80)]
    for i, bit in flips:
        bad = bytearray(SMALL_BLOB)
        bad[i] ^= bit
        try:
            out = decode(bytes(bad))
        except CodecError:
            refused += 1
            continue
        # A flip zstd can absorb (e.g. in an unused frame-header field) must be harmless.
        assert out.metadata == original.metadata
        for name, t in original.tensors.items():
            np.testing.assert_array_equal(out.tensors[name], t)
    assert refused >= 0.95 * len(flips)


def test_random_garbage_is_refused() -> None:
    rng = np.random.default_rng(0)
    for n in [0, 1, 5, 13, 100, 5000]:
        assert_refused(rng.bytes(n))
        assert_refused(MAGIC + bytes([FORMAT_VERSION]) + rng.bytes(n))


@pytest.mark.parametrize("magic", [b"PK\x03\x04", b"FMQ\x00", b"\x28\xb5\x2f\xfd"])
def test_wrong_magic_is_refused(magic: bytes) -> None:
    assert_refused(magic + SMALL_BLOB[4:], "magic")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_format_versions_are_refused(version: int) -> None:
    header, payload = split(SMALL_BLOB)
    assert_refused(pack(header, frame(payload), version=version), "version")


def test_a_header_length_over_the_limit_is_refused_before_it_is_read() -> None:
    assert_refused(pack(b"{}", b"", head_len=2**32 - 1), "header is 4294967295 bytes")
    assert_refused(SMALL_BLOB, "header is", limits=DecodeLimits(max_header_bytes=16))


def test_a_blob_over_the_compressed_size_cap_is_refused() -> None:
    assert_refused(
        SMALL_BLOB, "over the", limits=DecodeLimits(max_compressed_bytes=len(SMALL_BLOB) - 1)
    )


def test_a_header_with_a_wrong_checksum_is_refused() -> None:
    header, payload = split(SMALL_BLOB)
    assert_refused(pack(header, frame(payload), crc=12345), "checksum")


@pytest.mark.parametrize(
    "head",
    [
        b"\xff\xfe{",
        b"{not json",
        b"[1, 2]",
        b"[" * 100_000,
        b'{"payload_size": ' + b"9" * 5000 + b"}",
        b"null",
    ],
)
def test_a_header_that_is_not_a_json_object_is_refused(head: bytes) -> None:
    assert_refused(pack(head, frame(b"")), "header")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        node: Any = h
        for key in keys:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return edit


HEADER_LIES = {
    "shape is larger than the bytes": (_set("tensors.0.shape", [3, 5]), "needs 60 bytes"),
    "length disagrees with the shape": (_set("tensors.1.length", 16), "needs 12 bytes"),
    "dtype says int for a float record": (_set("tensors.0.dtype", "int32"), "expected 'raw'"),
    "dtype is not supported": (_set("tensors.0.dtype", "float64"), "unsupported dtype"),
    "dtype is not a string": (_set("tensors.0.dtype", ["float32"]), "unsupported dtype"),
    "encoding is not a string": (_set("encoding", {"fp32": 1}), "unknown encoding"),
    "record encoding differs from the blob": (_set("tensors.0.enc", "bf16"), "expected 'fp32'"),
    "blob encoding is unknown": (_set("encoding", "fp8"), "unknown encoding"),
    "offsets overlap": (_set("tensors.1.offset", 40), "overlaps"),
    "offsets leave a gap": (_set("tensors.1.offset", 56), "gap"),
    "first offset is not zero": (_set("tensors.0.offset", 8), "gap"),
    "payload size is larger than the tensors": (_set("payload_size", 80), "tensors end at 72"),
    "payload size is smaller than the tensors": (_set("payload_size", 64), "past the"),
    "a dimension is negative": (_set("tensors.0.shape", [-3, -4]), "non-negative"),
    "a dimension is a bool": (_set("tensors.2.shape", [True]), "non-negative"),
    "a dimension is a float": (_set("tensors.0.shape", [3.0, 4]), "non-negative"),
    "the shape is a string": (_set("tensors.0.shape", "3x4"), "invalid shape"),
    "the shape has too many dims": (_set("tensors.0.shape", [1] * 40), "invalid shape"),
    "a name repeats": (_set("tensors.1.name", "w"), "twice"),
    "a name is empty": (_set("tensors.1.name", ""), "invalid name"),
    "a record has an unknown key": (_set("tensors.0.extra", 1), "unknown keys"),
    "the header has an unknown key": (_set("extra", 1), "unknown keys"),
    "shuffle is not a bool": (_set("tensors.0.shuffle", 1), "shuffle"),
    "delta has no base version": (_set("delta", True), "base_version"),
    "base version without delta": (_set("base_version", "v1"), "base_version"),
    "metadata is not strings": (_set("metadata", {"a": 1}), "metadata"),
    "tensors is not a list": (_set("tensors", {"w": 1}), "must be a list"),
    "a record is not an object": (_set("tensors.0", [1, 2]), "must be an object"),
}


@pytest.mark.parametrize("lie", list(HEADER_LIES), ids=list(HEADER_LIES))
def test_a_header_that_lies_is_refused(lie: str) -> None:
    edit, match = HEADER_LIES[lie]
    assert_refused(rebuilt(SMALL_BLOB, edit_header=edit), match)


def test_a_header_missing_a_key_is_refused() -> None:
    assert_refused(
        rebuilt(SMALL_BLOB, edit_header=lambda h: h["tensors"][0].pop("length")), "missing keys"
    )


def test_more_tensors_than_the_limit_are_refused() -> None:
    assert_refused(SMALL_BLOB, "over the limit of 2", limits=DecodeLimits(max_tensors=2))


TOPK_BLOB = encode(
    {"t": np.arange(1, 13, dtype=np.float32)}, Encoding.TOPK, topk_fraction=0.25, shuffle=False
)  # keeps 3: gaps u32 x3, values u16 x3


def test_a_sparse_record_describing_a_huge_dense_tensor_is_refused() -> None:
    def huge(h: dict[str, Any]) -> None:
        h["tensors"][0]["shape"] = [2**31]

    assert_refused(rebuilt(TOPK_BLOB, edit_header=huge), "decoded tensors exceed")
    assert_refused(rebuilt(TOPK_BLOB, edit_header=_set("tensors.0.shape", [2**40])), "keeps k")
    assert_refused(rebuilt(TOPK_BLOB, edit_header=_set("tensors.0.k", 13)), "keeps k")


def test_top_k_indices_out_of_range_or_repeated_are_refused() -> None:
    def far(p: bytearray) -> None:
        p[0:4] = struct.pack("<I", 1000)

    def repeat(p: bytearray) -> None:
        p[4:8] = struct.pack("<I", 0)

    assert_refused(rebuilt(TOPK_BLOB, edit_payload=far), "out of range")
    assert_refused(rebuilt(TOPK_BLOB, edit_payload=repeat), "repeat")


def _poisoned(encoding: Encoding, pos: int, raw: bytes) -> bytes:
    blob = encode({"w": np.ones((2, 2), np.float32)}, encoding, shuffle=False)

    def poison(p: bytearray) -> None:
        p[pos : pos + len(raw)] = raw

    return rebuilt(blob, edit_payload=poison)


NAN_F32, INF_F32 = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
POISONS = {
    "fp32 NaN": (Encoding.FP32, 4, NAN_F32),
    "fp32 Inf": (Encoding.FP32, 4, INF_F32),
    "bf16 NaN": (Encoding.BF16, 2, struct.pack("<H", 0x7FC0)),
    "bf16 -Inf": (Encoding.BF16, 2, struct.pack("<H", 0xFF80)),
    "fp16 NaN": (Encoding.FP16, 2, struct.pack("<H", 0x7E00)),
    "fp16 Inf": (Encoding.FP16, 2, struct.pack("<H", 0x7C00)),
    "int8 NaN scale": (Encoding.INT8, 0, NAN_F32),
    "int8 Inf scale": (Encoding.INT8, 4, INF_F32),
    "int8 scale overflowing to Inf": (Encoding.INT8, 0, struct.pack("<f", 3e38)),
    "topk NaN value": (Encoding.TOPK, 4, struct.pack("<H", 0x7FC0)),
}


@pytest.mark.parametrize("case", list(POISONS), ids=list(POISONS))
def test_nan_and_inf_payloads_are_refused(case: str) -> None:
    assert_refused(_poisoned(*POISONS[case]), "NaN or Inf")


def test_nonzero_alignment_padding_is_refused() -> None:
    def pad(p: bytearray) -> None:
        p[60] = 1

    assert_refused(rebuilt(SMALL_BLOB, edit_payload=pad), "padding")


def test_a_bool_tensor_holding_other_bytes_is_refused() -> None:
    blob = encode({"m": np.array([True, False])}, shuffle=False)

    def two(p: bytearray) -> None:
        p[1] = 2

    assert_refused(rebuilt(blob, edit_payload=two), "bool")


EXPECTED = spec_of(SMALL)
SPEC_MISMATCHES = {
    "a tensor is missing": ({**EXPECTED, "extra": TensorSpec((1,), "float32")}, "missing 'extra'"),
    "a tensor is unexpected": ({k: v for k, v in EXPECTED.items() if k != "b"}, "unexpected 'b'"),
    "a shape differs": ({**EXPECTED, "w": TensorSpec((4, 3), "float32")}, "expected float32"),
    "a dtype differs": ({**EXPECTED, "n": TensorSpec((), "int32")}, "expected int32"),
}


@pytest.mark.parametrize("case", list(SPEC_MISMATCHES), ids=list(SPEC_MISMATCHES))
def test_a_blob_not_matching_the_expected_spec_is_refused(case: str) -> None:
    expected, match = SPEC_MISMATCHES[case]
    assert_refused(SMALL_BLOB, match, expected=expected)


def test_the_matching_spec_is_accepted() -> None:
    assert decode(SMALL_BLOB, expected=EXPECTED).metadata == {"run": "r1"}


def test_frames_that_are_missing_doubled_trailed_or_unchecksummed_are_refused() -> None:
    header, payload = split(SMALL_BLOB)
    good = frame(payload)
    assert_refused(pack(header, b""), "not a zstd frame")
    assert_refused(pack(header, good + good), "unused data")
    assert_refused(pack(header, good + b"\x00"), "unused data")
    assert_refused(pack(header, frame(payload, checksum=False)), "checksum")
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 0xFF
    assert_refused(pack(header, bytes(bad_sum)), "checksum")


def test_a_frame_holding_other_bytes_than_the_header_says_is_refused() -> None:
    header, payload = split(SMALL_BLOB)
    assert_refused(pack(header, frame(payload + b"\x00" * 8)), "header says 72")
    assert_refused(pack(header, frame(payload, content_size=False)[:-1]), "decompress")
    assert_refused(
        pack(header, frame(payload[:-8] + b"\x00" * 16, content_size=False)), "decompress"
    )


def _frame_header(content_size: int) -> bytes:
    # Frame header descriptor 0xE4: 8-byte content size, single segment, checksum flag.
    return b"\x28\xb5\x2f\xfd\xe4" + content_size.to_bytes(8, "little")


def test_a_frame_claiming_100_gb_is_refused_without_allocating_it() -> None:
    header, _ = split(SMALL_BLOB)
    bomb = pack(header, _frame_header(100 * 10**9) + b"\x00" * 64)
    assert peak_memory(lambda: assert_refused(bomb, "claims 100000000000 bytes")) < 1 << 20
    lying = {**header, "payload_size": 100 * 10**9}
    assert_refused(pack(lying, _frame_header(100 * 10**9)), "over the")


@pytest.fixture(scope="module")
def zeros_gib() -> Iterator[dict[str, bytes]]:
    """1 GiB of zeros compressed (~40 KiB), with and without a content size, built by
    streaming so the test itself never holds the gigabyte."""
    chunk = bytes(1 << 20)
    frames = {}
    for with_size in (True, False):
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
        obj = cctx.compressobj(size=GiB) if with_size else cctx.compressobj()
        parts = [obj.compress(chunk) for _ in range(GiB // len(chunk))]
        frames["sized" if with_size else "unsized"] = b"".join([*parts, obj.flush()])
    yield frames


def test_a_zstd_bomb_declared_honestly_is_refused_before_decompressing(
    zeros_gib: dict[str, bytes],
) -> None:
    header = {
        "encoding": "fp32",
        "delta": False,
        "base_version": None,
        "metadata": {},
        "payload_size": GiB,
        "tensors": [
            {
                "name": "w",
                "dtype": "float32",
                "shape": [GiB // 4],
                "enc": "fp32",
                "offset": 0,
                "length": GiB,
                "shuffle": False,
            }
        ],
    }
    blob = pack(header, zeros_gib["sized"])
    assert peak_memory(lambda: assert_refused(blob, "over the")) < 4 << 20


def test_a_zstd_bomb_behind_a_small_header_is_refused_by_its_frame_header(
    zeros_gib: dict[str, bytes],
) -> None:
    header, _ = split(SMALL_BLOB)
    blob = pack(header, zeros_gib["sized"])
    assert peak_memory(lambda: assert_refused(blob, "claims 1073741824")) < 4 << 20
    roomy = DecodeLimits(max_decompressed_bytes=2 * GiB)
    assert peak_memory(lambda: assert_refused(blob, "header says 72", limits=roomy)) < 4 << 20


def test_a_zstd_bomb_without_a_content_size_stops_at_the_declared_size(
    zeros_gib: dict[str, bytes],
) -> None:
    header, _ = split(SMALL_BLOB)
    blob = pack(header, zeros_gib["unsized"])
    assert peak_memory(lambda: assert_refused(blob, "decompress")) < 4 << 20


@pytest.mark.parametrize("value", ["a text", None, 42, [1, 2], np.zeros(40, np.uint8)[::2]])
def test_a_value_that_is_not_a_contiguous_bytes_buffer_is_refused(value: Any) -> None:
    assert_refused(value)


def test_any_contiguous_buffer_holding_a_blob_decodes() -> None:
    arr = np.frombuffer(SMALL_BLOB, np.uint8)
    for buffer in (bytearray(SMALL_BLOB), memoryview(SMALL_BLOB), arr, arr.reshape(1, -1)):
        np.testing.assert_array_equal(decode(buffer).tensors["b"], SMALL["b"])


def test_peek_header_refuses_what_decode_refuses() -> None:
    with pytest.raises(CodecError, match="magic"):
        peek_header(b"XXXX" + SMALL_BLOB[4:])
    with pytest.raises(CodecError, match="gap"):
        peek_header(rebuilt(SMALL_BLOB, edit_header=_set("tensors.1.offset", 56)))
