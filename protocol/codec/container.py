"""The blob's framing: prefix, JSON header, one zstd frame of payload.

    b"FMQT" | u8 format version | u32 header length | u32 CRC-32 of header | header | zstd

The header sits outside the compressed frame so ``peek_header`` and the spec checks run
before a single payload byte is decompressed; its CRC catches corruption that would
otherwise still parse. The payload carries zstd's own content checksum.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from typing import Any

import zstandard

from protocol.codec.errors import CodecError
from protocol.codec.limits import DecodeLimits

MAGIC = b"FMQT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBII")
PREFIX_SIZE = _PREFIX.size
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_UNKNOWN_SIZE = (1 << 64) - 1
# zstd's own default limit; set explicitly so a frame cannot ask for a larger window.
_MAX_WINDOW = 1 << 27


def compressor(level: int) -> zstandard.ZstdCompressor:
    # threads=0: compress on the calling thread; the bus runs many encoders side by side.
    return zstandard.ZstdCompressor(
        level=level, write_checksum=True, write_content_size=True, threads=0
    )


def pack(header: dict[str, Any], payload: Any, cctx: zstandard.ZstdCompressor) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head))
    return b"".join((prefix, head, cctx.compress(payload)))


def unpack(blob: memoryview, limits: DecodeLimits) -> tuple[Any, memoryview]:
    """The parsed (not yet validated) JSON header and the zstd frame that follows it."""
    head, frame = split(blob, limits)
    return parse_json(head), frame


def split(blob: memoryview, limits: DecodeLimits) -> tuple[bytes, memoryview]:
    """The header's bytes (prefix and CRC checked, not parsed) and the zstd frame."""
    if len(blob) > limits.max_compressed_bytes:
        raise CodecError(
            f"blob is {len(blob)} bytes, over the {limits.max_compressed_bytes}-byte limit"
        )
    if len(blob) < PREFIX_SIZE:
        if bytes(blob[:4]) != MAGIC[: len(blob[:4])]:
            raise CodecError("not a fedmq tensor blob (wrong magic)")
        raise CodecError(f"blob is truncated: {len(blob)} bytes, prefix needs {PREFIX_SIZE}")
    magic, version, head_len, crc = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError(f"not a fedmq tensor blob (wrong magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported blob format version {version} (this is {FORMAT_VERSION})")
    if head_len > limits.max_header_bytes:
        raise CodecError(f"header is {head_len} bytes, over the {limits.max_header_bytes} limit")
    end = PREFIX_SIZE + head_len
    if len(blob) < end:
        raise CodecError(f"blob is truncated inside the header ({len(blob)} < {end} bytes)")
    head = bytes(blob[PREFIX_SIZE:end])
    if zlib.crc32(head) != crc:
        raise CodecError("header checksum mismatch (corrupted blob)")
    return head, blob[end:]


def parse_json(head: bytes) -> Any:
    try:
        return json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"header is not valid JSON: {e}") from None


def decompress(frame: memoryview, payload_size: int, limits: DecodeLimits) -> bytes:
    """Exactly ``payload_size`` bytes from one zstd frame, never allocating more.

    ``payload_size`` has already been checked against the limit. The frame header's
    content size is read first, so a frame claiming more is refused before allocation; a
    frame without a content size is decompressed into a buffer of ``payload_size`` bytes
    and refused if it does not fit.
    """
    if len(frame) < 4 or bytes(frame[:4]) != _ZSTD_MAGIC:
        raise CodecError("payload is missing or is not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload zstd frame header is invalid: {e}") from None
    if not params.has_checksum:
        raise CodecError("payload zstd frame has no content checksum")
    size = params.content_size
    if size != _ZSTD_UNKNOWN_SIZE:
        if size > limits.max_decompressed_bytes:
            raise CodecError(
                f"payload claims {size} bytes decompressed, over the "
                f"{limits.max_decompressed_bytes}-byte limit"
            )
        if size != payload_size:
            raise CodecError(f"payload frame holds {size} bytes, header says {payload_size}")
    if params.window_size > _MAX_WINDOW:
        raise CodecError(f"payload zstd window of {params.window_size} bytes is too large")
    dctx = _decompressor()
    try:
        # max_output_size only matters without a content size: it is then the one buffer
        # zstd writes into, and overflowing it is an error (0 would mean "unbounded").
        data = dctx.decompress(frame, max_output_size=max(payload_size, 1), allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload does not decompress: {e}") from None
    if len(data) != payload_size:
        raise CodecError(f"payload decompressed to {len(data)} bytes, header says {payload_size}")
    return data


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # One per thread, reused: making one costs more than decompressing a 1 KB update, and a
    # decompressor may not be shared between threads.
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    return dctx
