"""encode / decode: a dict of tensors to a compressed, self-describing blob and back."""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import zstandard

from protocol.codec import container
from protocol.codec.arrays import TensorSpec, as_numpy, decoded_dtype, is_float
from protocol.codec.encodings import (
    RAW,
    Encoding,
    decode_float,
    encode_float,
    layout,
    record_length,
    topk_count,
)
from protocol.codec.errors import CodecError
from protocol.codec.header import MAX_NAME, MAX_VERSION, BlobHeader, Record, align, parse_header
from protocol.codec.limits import DecodeLimits
from protocol.codec.planes import prefers_shuffle, read_part, write_part

Shuffle = bool | Literal["auto"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class DecodedBlob:
    """Decoded tensors (float32 for float inputs, original dtype otherwise) and metadata.

    When ``delta`` is true the float tensors are differences against model version
    ``base_version``; ``apply_delta`` turns them back into weights.
    """

    tensors: dict[str, np.ndarray]
    encoding: Encoding
    delta: bool
    base_version: str | None
    metadata: dict[str, str]


def encode(
    tensors: Mapping[str, Any],
    encoding: Encoding | str = Encoding.BF16,
    *,
    base: Mapping[str, Any] | None = None,
    base_version: str | None = None,
    metadata: Mapping[str, str] | None = None,
    shuffle: Shuffle = "auto",
    level: int = 1,
    topk_fraction: float = 0.01,
) -> bytes:
    """Encode numpy arrays or torch tensors into one blob.

    Float tensors are stored with ``encoding``; integer and bool tensors are stored raw and
    round-trip exactly. With ``base`` (same names and shapes) the float tensors stored are
    ``tensors - base`` and the header records ``base_version``. ``level`` 1 is the default
    because on shuffled weights it is both faster and smaller than 3 (docs/benchmarks.md).
    """
    enc = _encoding(encoding)
    if shuffle not in (True, False, "auto"):
        raise CodecError(f"shuffle must be True, False or 'auto', not {shuffle!r}")
    if not (isinstance(level, int) and -7 <= level <= 22):
        raise CodecError(f"zstd level must be an integer in [-7, 22], not {level!r}")
    if isinstance(topk_fraction, bool) or not (
        isinstance(topk_fraction, float | int) and 0 < topk_fraction <= 1
    ):
        raise CodecError(f"topk_fraction must be in (0, 1], not {topk_fraction!r}")
    meta = _metadata(metadata)
    arrays = {_name(n): as_numpy(n, v) for n, v in tensors.items()}
    if base is not None:
        arrays = _subtract(arrays, base, base_version)
    elif base_version is not None:
        raise CodecError("base_version given without base")

    records, end = [], 0
    for name, arr in arrays.items():
        rec_enc = str(enc) if is_float(arr) else RAW
        k = topk_count(arr.size, topk_fraction) if rec_enc == Encoding.TOPK else 0
        shape = tuple(int(d) for d in arr.shape)
        length = record_length(layout(rec_enc, shape, decoded_dtype(arr), k))
        offset = align(end)
        records.append(Record(name, decoded_dtype(arr), shape, rec_enc, offset, length, False, k))
        end = offset + length

    cctx = container.compressor(level)
    payload = np.zeros(end, dtype=np.uint8)  # zeros: alignment padding must read as 0
    for i, (rec, arr) in enumerate(zip(records, arrays.values(), strict=True)):
        if rec.enc == RAW:
            parts = [arr.reshape(-1).astype(arr.dtype.newbyteorder("<"), copy=False)]
        else:
            x = arr.astype(np.float32, copy=False)
            parts, _ = encode_float(rec.name, x, enc, float(topk_fraction))
        use = shuffle if shuffle != "auto" else prefers_shuffle(parts, cctx)
        pos = rec.offset
        for part in parts:
            write_part(payload[pos : pos + part.nbytes], part, use)
            pos += part.nbytes
        records[i] = dataclasses.replace(rec, shuffle=bool(use))

    header = BlobHeader(enc, base is not None, base_version, meta, {}, end, tuple(records))
    return container.pack(header.to_json(), payload, cctx)


def peek_header(
    blob: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()
) -> BlobHeader:
    """The blob's header, fully validated, without decompressing the payload."""
    return _boundary(lambda: _fresh(_header(container.split(_view(blob), limits)[0], limits)))


def decode(
    blob: bytes | bytearray | memoryview,
    *,
    limits: DecodeLimits = DecodeLimits(),
    expected: Mapping[str, TensorSpec] | None = None,
) -> DecodedBlob:
    """Decode a blob from ``encode``, checking it against ``limits`` and ``expected``.

    Any problem (corruption, truncation, a limit, a spec mismatch, NaN/Inf) raises
    ``CodecError``; the header is checked before anything is decompressed or allocated.
    """
    return _boundary(lambda: _decode(_view(blob), limits, expected))


def validate(
    blob: bytes | bytearray | memoryview,
    *,
    limits: DecodeLimits = DecodeLimits(),
    expected: Mapping[str, TensorSpec] | None = None,
) -> None:
    """Refuse (``CodecError``) exactly what ``decode`` refuses, without building the tensors.

    For a receiver that only stores the blob (the orchestrator's ingest): the header, the
    spec, the limits, the zstd frame and its checksum, the padding are checked as in
    ``decode``; a float record's NaN/Inf check reads the exponent bits of its bytes where
    they lie (``_finite_bits``) instead of un-shuffling and widening it to float32 first,
    which was a third of decoding a 1 MB fp32 update.
    """
    _boundary(lambda: _decode(_view(blob), limits, expected, materialize=False))


def apply_delta(
    base: Mapping[str, Any], decoded: DecodedBlob, *, base_version: str | None = None
) -> dict[str, np.ndarray]:
    """Weights from a decoded delta: ``base + delta`` for floats, the sent value otherwise.

    ``base_version``, when given, must be the version the delta was made against.
    """
    if not decoded.delta:
        raise CodecError("blob is not a delta")
    if base_version is not None and base_version != decoded.base_version:
        raise CodecError(f"delta is against {decoded.base_version!r}, not {base_version!r}")
    if base.keys() != decoded.tensors.keys():
        raise CodecError(_key_diff("base", base.keys(), decoded.tensors.keys()))
    out: dict[str, np.ndarray] = {}
    for name, d in decoded.tensors.items():
        if d.dtype != np.float32:
            out[name] = d.copy()  # counters and the like travel as values, not differences
            continue
        b = as_numpy(name, base[name])
        if b.shape != d.shape:
            raise CodecError(f"tensor {name!r}: base shape {b.shape} != delta shape {d.shape}")
        out[name] = b.astype(np.float32) + d
    return out


def _decode(
    blob: memoryview,
    limits: DecodeLimits,
    expected: Mapping[str, TensorSpec] | None,
    *,
    materialize: bool = True,
) -> DecodedBlob:
    head, frame = container.split(blob, limits)
    header = _header(head, limits)
    if expected is not None:
        _check_expected(header.tensors, expected)
    payload = np.frombuffer(container.decompress(frame, header.payload_size, limits), np.uint8)
    tensors: dict[str, np.ndarray] = {}
    end = 0
    for rec in header.records:
        if payload[end : rec.offset].any():
            raise CodecError(f"nonzero padding before tensor {rec.name!r}")
        if materialize or not _finite_bits(rec, payload):
            tensors[rec.name] = _decode_record(rec, payload, header.encoding)
        end = rec.offset + rec.length
    return DecodedBlob(
        tensors, header.encoding, header.delta, header.base_version, dict(header.metadata)
    )


# Headers at most this long are remembered, parsed and validated, by their exact bytes: the
# updates of one run share one header (same model, same encoding), and parsing it was half
# the cost of decoding a small update. 256 of them are at most 4 MiB.
_CACHED_HEAD = 16 << 10


def _header(head: bytes, limits: DecodeLimits) -> BlobHeader:
    """The validated header of these bytes; callers must not mutate what it holds
    (``_fresh`` copies its dicts for anyone outside this module)."""
    if len(head) > _CACHED_HEAD:
        return parse_header(container.parse_json(head), limits)
    return _cached_header(head, limits)


@functools.lru_cache(maxsize=256)
def _cached_header(head: bytes, limits: DecodeLimits) -> BlobHeader:
    # A refused header raises and is not cached; the same bytes are refused again.
    return parse_header(container.parse_json(head), limits)


def _fresh(header: BlobHeader) -> BlobHeader:
    return dataclasses.replace(header, metadata=dict(header.metadata), tensors=dict(header.tensors))


def _decode_record(rec: Record, payload: np.ndarray, enc: Encoding) -> np.ndarray:
    parts, pos = [], rec.offset
    for dtype, n in layout(rec.enc, rec.shape, rec.dtype, rec.k):
        nbytes = dtype.itemsize * n
        parts.append(read_part(payload[pos : pos + nbytes], dtype, n, rec.shuffle))
        pos += nbytes
    if rec.enc != RAW:
        return decode_float(rec.name, rec.enc, parts, rec.shape)
    out = parts[0].astype(np.dtype(rec.dtype)).reshape(rec.shape)  # copy: payload is read-only
    if rec.dtype == "bool" and parts[0].view(np.uint8).max(initial=0) > 1:
        raise CodecError(f"tensor {rec.name!r}: bool values other than 0 and 1")
    return out


# Where a float's exponent lies in its little-endian bytes: (mask of the top byte, whether
# the next byte's top bit is the exponent's last bit). All exponent bits set is NaN or Inf.
_EXPONENT_BITS: dict[str, tuple[int, bool]] = {
    Encoding.FP32: (0x7F, True),
    Encoding.BF16: (0x7F, True),  # the upper half of a float32
    Encoding.FP16: (0x7C, False),
}


def _finite_bits(rec: Record, payload: np.ndarray) -> bool:
    """True when ``rec`` is a float record whose NaN/Inf check was done on its bytes
    (refusing as ``decode_float`` does); False for the records that are decoded to check."""
    bits = _EXPONENT_BITS.get(rec.enc)
    if bits is None:
        return False
    ((dtype, n),) = layout(rec.enc, rec.shape, rec.dtype, rec.k)
    k = dtype.itemsize
    raw = payload[rec.offset : rec.offset + k * n]
    # Byte j of every element: a plane when shuffled, else a strided column.
    planes = raw.reshape(k, n) if rec.shuffle else raw.reshape(n, k).T
    top_mask, spills = bits
    exp = planes[k - 1] & top_mask == top_mask
    if spills and exp.any():
        exp &= planes[k - 2] >= 0x80
    if exp.any():
        raise CodecError(f"tensor {rec.name!r} decodes to NaN or Inf")
    return True


def _boundary(fn: Callable[[], _T]) -> _T:
    # Checks above should raise CodecError first; this keeps the one-error-type promise if
    # a malformed blob reaches numpy, struct or zstd in a way they did not foresee.
    try:
        return fn()
    except CodecError:
        raise
    except (
        ValueError,
        TypeError,
        OverflowError,
        IndexError,
        KeyError,
        RecursionError,
        BufferError,
        struct.error,
        zstandard.ZstdError,
    ) as e:
        raise CodecError(f"malformed blob: {type(e).__name__}: {e}") from e


def _view(blob: bytes | bytearray | memoryview) -> memoryview:
    # A flat byte view whatever buffer came in (numpy arrays give multi-dim views).
    view = memoryview(blob)
    if not view.c_contiguous:
        raise CodecError("blob must be a contiguous bytes-like buffer")
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def _encoding(encoding: Encoding | str) -> Encoding:
    try:
        return Encoding(encoding)
    except ValueError:
        names = ", ".join(e.value for e in Encoding)
        raise CodecError(f"unknown encoding {encoding!r} (one of {names})") from None


def _name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise CodecError(f"tensor names must be non-empty strings of <= {MAX_NAME} chars")
    return name


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CodecError("metadata must map strings to strings")
    return meta


def _subtract(
    arrays: dict[str, np.ndarray], base: Mapping[str, Any], base_version: str | None
) -> dict[str, np.ndarray]:
    if not (isinstance(base_version, str) and 0 < len(base_version) <= MAX_VERSION):
        raise CodecError("a delta needs base_version, a non-empty string naming the base")
    if base.keys() != arrays.keys():
        raise CodecError(_key_diff("base", base.keys(), arrays.keys()))
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if not is_float(arr):
            out[name] = arr
            continue
        b = as_numpy(name, base[name])
        if b.shape != arr.shape:
            raise CodecError(f"tensor {name!r}: base shape {b.shape} != shape {arr.shape}")
        out[name] = arr.astype(np.float32, copy=False) - b.astype(np.float32, copy=False)
    return out


def _key_diff(what: str, got: Iterable[str], want: Iterable[str]) -> str:
    got_s, want_s = set(got), set(want)
    missing, extra = sorted(want_s - got_s)[:5], sorted(got_s - want_s)[:5]
    return f"{what} has different tensors: missing {missing}, unexpected {extra}"


def _check_expected(actual: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    problems = [f"missing {n!r}" for n in expected if n not in actual]
    problems += [f"unexpected {n!r}" for n in actual if n not in expected]
    problems += [
        f"{n!r} is {actual[n]}, expected {spec}"
        for n, spec in expected.items()
        if n in actual and (actual[n].shape != tuple(spec.shape) or actual[n].dtype != spec.dtype)
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CodecError(
            "blob does not match the expected model: " + "; ".join(problems[:5]) + more
        )
