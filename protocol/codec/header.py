"""The JSON header: building it, and validating one from the wire into typed records.

Validation is strict (exact key sets, exact types) because the header decides every
allocation the decoder makes: nothing in it is used before it has been checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.codec.arrays import ALLOWED_DTYPES, FLOAT_DTYPE, TensorSpec
from protocol.codec.encodings import RAW, TOPK_MAX_NUMEL, Encoding, layout, record_length
from protocol.codec.errors import CodecError
from protocol.codec.limits import DecodeLimits

ALIGN = 8  # records start 8-byte aligned so every part can be viewed in place
MAX_NDIM = 32
MAX_NAME = 1024
MAX_VERSION = 256

_TOP_KEYS = {"encoding", "delta", "base_version", "metadata", "payload_size", "tensors"}
_RECORD_KEYS = {"name", "dtype", "shape", "enc", "offset", "length", "shuffle"}


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Record:
    """Where and how one tensor is stored in the payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    enc: str
    offset: int
    length: int
    shuffle: bool
    k: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "enc": self.enc,
            "offset": self.offset,
            "length": self.length,
            "shuffle": self.shuffle,
        }
        if self.enc == Encoding.TOPK:
            out["k"] = self.k
        return out


@dataclass(frozen=True)
class BlobHeader:
    """What a blob says about itself, readable without decompressing the payload."""

    encoding: Encoding
    delta: bool
    base_version: str | None
    metadata: dict[str, str]
    tensors: dict[str, TensorSpec]
    payload_size: int
    records: tuple[Record, ...] = field(repr=False, default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "encoding": str(self.encoding),
            "delta": self.delta,
            "base_version": self.base_version,
            "metadata": self.metadata,
            "payload_size": self.payload_size,
            "tensors": [r.to_json() for r in self.records],
        }


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:  # bool is an int subclass; refuse it too
        raise CodecError(f"header: {what} must be a non-negative integer, got {v!r}")
    return v


def _keys(obj: Any, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CodecError(f"header: {what} must be an object")
    missing, extra = required - obj.keys(), obj.keys() - required - optional
    if missing or extra:
        raise CodecError(
            f"header: {what} has missing keys {sorted(missing)} / unknown keys {sorted(extra)}"
        )
    return obj


def parse_header(obj: Any, limits: DecodeLimits) -> BlobHeader:
    obj = _keys(obj, _TOP_KEYS, set(), "header")
    try:
        encoding = Encoding(obj["encoding"])
    except ValueError:
        raise CodecError(f"header: unknown encoding {obj['encoding']!r}") from None
    delta, version = obj["delta"], obj["base_version"]
    if type(delta) is not bool:
        raise CodecError("header: delta must be true or false")
    if delta != (version is not None):
        raise CodecError("header: base_version must be given exactly when delta is true")
    if version is not None and not (isinstance(version, str) and 0 < len(version) <= MAX_VERSION):
        raise CodecError("header: base_version must be a non-empty string")
    meta = obj["metadata"]
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("header: metadata must map strings to strings")
    payload_size = _int(obj["payload_size"], "payload_size")
    if payload_size > limits.max_decompressed_bytes:
        raise CodecError(
            f"header: payload of {payload_size} bytes is over the "
            f"{limits.max_decompressed_bytes}-byte limit"
        )
    entries = obj["tensors"]
    if not isinstance(entries, list):
        raise CodecError("header: tensors must be a list")
    if len(entries) > limits.max_tensors:
        raise CodecError(f"header: {len(entries)} tensors, over the limit of {limits.max_tensors}")
    records = _parse_records(entries, encoding, payload_size, limits)
    return BlobHeader(
        encoding=encoding,
        delta=delta,
        base_version=version,
        metadata=dict(meta),
        tensors={r.name: TensorSpec(r.shape, r.dtype) for r in records},
        payload_size=payload_size,
        records=records,
    )


def _parse_records(
    entries: list[Any], encoding: Encoding, payload_size: int, limits: DecodeLimits
) -> tuple[Record, ...]:
    records: list[Record] = []
    seen: set[str] = set()
    end = 0
    dense_bytes = 0
    for i, entry in enumerate(entries):
        rec = _parse_record(entry, i, encoding)
        if rec.name in seen:
            raise CodecError(f"header: tensor {rec.name!r} appears twice")
        seen.add(rec.name)
        want = align(end)
        if rec.offset != want:
            how = "overlaps the previous tensor" if rec.offset < want else "leaves a gap"
            raise CodecError(
                f"header: tensor {rec.name!r} at offset {rec.offset} {how} (expected offset {want})"
            )
        end = rec.offset + rec.length
        if end > payload_size:
            raise CodecError(
                f"header: tensor {rec.name!r} ends at {end}, past the {payload_size}-byte payload"
            )
        # Sparse records can describe dense tensors far larger than their bytes.
        dense_bytes += math.prod(rec.shape) * np.dtype(rec.dtype).itemsize
        if dense_bytes > limits.max_decompressed_bytes:
            raise CodecError(
                f"header: decoded tensors exceed the {limits.max_decompressed_bytes}-byte limit"
            )
        records.append(rec)
    if end != payload_size:
        raise CodecError(f"header: tensors end at {end}, payload is {payload_size} bytes")
    return tuple(records)


def _parse_record(entry: Any, i: int, encoding: Encoding) -> Record:
    optional = {"k"} if isinstance(entry, dict) and entry.get("enc") == Encoding.TOPK else set()
    entry = _keys(entry, _RECORD_KEYS | optional, set(), f"tensor #{i}")
    name = entry["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise CodecError(f"header: tensor #{i} has an invalid name")
    dtype, enc = entry["dtype"], entry["enc"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"header: tensor {name!r} has unsupported dtype {dtype!r}")
    want_enc = str(encoding) if dtype == FLOAT_DTYPE else RAW
    if enc != want_enc:
        raise CodecError(
            f"header: tensor {name!r} ({dtype}) has encoding {enc!r}, expected {want_enc!r}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CodecError(f"header: tensor {name!r} has an invalid shape")
    shape_t = tuple(_int(d, f"tensor {name!r} dimension") for d in shape)
    k = _int(entry.get("k", 0), f"tensor {name!r} k")
    numel = math.prod(shape_t)
    if enc == Encoding.TOPK and (k > numel or numel >= TOPK_MAX_NUMEL):
        raise CodecError(f"header: tensor {name!r} keeps k={k} of {numel} elements")
    if type(entry["shuffle"]) is not bool:
        raise CodecError(f"header: tensor {name!r} shuffle must be true or false")
    rec = Record(
        name,
        dtype,
        shape_t,
        enc,
        _int(entry["offset"], f"tensor {name!r} offset"),
        _int(entry["length"], f"tensor {name!r} length"),
        entry["shuffle"],
        k,
    )
    want = record_length(layout(enc, shape_t, dtype, k))
    if rec.length != want:
        raise CodecError(
            f"header: tensor {name!r} has length {rec.length}, but {enc} "
            f"{dtype}{list(shape_t)} needs {want} bytes"
        )
    return rec
